"""The issue's gradient-slerp config on the real SmolLM2-135M model: the merge loads in transformers and generates."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from releaser_testing import cache_dir, noised_variant

pytestmark = pytest.mark.slow


def test_gradient_slerp_on_smollm2_loads_and_generates(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = noised_variant(smollm2, cache_dir() / "smollm2-variant-a", seed=1)
    b = noised_variant(smollm2, cache_dir() / "smollm2-variant-b", seed=2)
    cfg = {
        "slices": [{"sources": [{"model": str(a), "layer_range": [0, 30]}, {"model": str(b), "layer_range": [0, 30]}]}],
        "merge_method": "slerp", "base_model": str(a),
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
        "dtype": "bfloat16",
    }
    path = tmp_path / "slerp.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    from releaser.merge import run_merge

    out = tmp_path / "merged"
    result = run_merge(path, out)
    assert result.tensors == 272
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["tie_word_embeddings"] is True
    assert (out / "chat_template.jinja").exists() and (out / "generation_config.json").exists()

    tok = AutoTokenizer.from_pretrained(out)
    assert config["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16
    model = model.float()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = tok.decode(gen[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text  # greedy, deterministic inputs: the merge keeps the model's knowledge
