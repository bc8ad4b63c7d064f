"""Coverage of a GGUF export: every source tensor is consumed or named as dropped on purpose (an unknown tensor, such
as a vision tower's, is an error naming it, never left out silently), and every tensor llama.cpp needs is produced (a
layer missing a tensor the others have, a missing embedding, final norm or untied output matrix: one line naming it,
before any file is written)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from releaser.errors import ModelError
from releaser.gguf import export_gguf
from releaser_testing import tiny_family_model


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory, smollm2):
    model = tiny_family_model(tmp_path_factory.mktemp("coverage") / "qwen3", "qwen3", tied=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2 / name, model / name)
    return model


def _edit(src, dst, drop=(), add=None, config=None):
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    for name in drop:
        del state[name]
    state.update(add or {})
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    if config:
        (dst / "config.json").write_text(json.dumps(json.loads((dst / "config.json").read_text()) | config))
    return dst


CASES = {
    "a layer without its q_norm": (dict(drop=["model.layers.1.self_attn.q_norm.weight"]),
                                   "model.layers.1.self_attn.q_norm.weight (GGUF blk.1.attn_q_norm.weight)"),
    "no final norm": (dict(drop=["model.norm.weight"]), "model.norm.weight (GGUF output_norm.weight)"),
    "untied without lm_head": (dict(drop=["lm_head.weight"]), "lm_head.weight (GGUF output.weight)"),
    "a vision tower": (dict(add={"model.vision_tower.patch_embed.weight": torch.zeros(4, 4)}),
                       "model.vision_tower.patch_embed.weight of"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_missing_or_unknown_tensors_are_named(qwen3, tmp_path, case):
    edit, words = CASES[case]
    model = _edit(qwen3, tmp_path / "model", **edit)
    with pytest.raises(ModelError) as e:
        export_gguf(model, tmp_path / "out", ["F32"], name="cov")
    assert words in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_tied_model_without_lm_head_and_rotary_buffers_export(qwen3, tmp_path):
    """Dropped on purpose: a rotary ``inv_freq`` buffer (llama.cpp computes it); tied embeddings need no output."""
    model = _edit(qwen3, tmp_path / "model", drop=["lm_head.weight"], config={"tie_word_embeddings": True},
                  add={"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(16)})
    result = export_gguf(model, tmp_path / "out", ["F32"], name="cov")
    assert result.files["F32"][0].is_file()
