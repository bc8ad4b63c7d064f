"""LoRA sources: a peft adapter folded into its base model while streaming, equal to peft's merge_and_unload (scaled
for weights other than 1) and to mergekit 0.1.5's ``model+lora``; bad adapters give one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from releaser.cli import app
from releaser.merge import run_merge
from releaser_testing import noised_variant, tiny_model

runner = CliRunner()
LAYERS = 3


def make_adapter(base: Path, out: Path, seed: int, **lora_kw) -> Path:
    """A LoRA with random (non-zero) A and B made with peft on ``base``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
            elif "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path, weight: float) -> dict[str, torch.Tensor]:
    """peft's merge_and_unload with the adapter's update scaled by ``weight``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(weight)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = tiny_model(root / "base", seed=0, layers=LAYERS)
    other = noised_variant(base, root / "other", seed=1)
    plain = make_adapter(base, root / "plain", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                         rank_pattern={"v_proj": 2}, alpha_pattern={"up_proj": 16})
    rslora = make_adapter(base, root / "rslora", 2, r=8, lora_alpha=4, use_rslora=True,
                          target_modules=["o_proj", "down_proj", "embed_tokens"], modules_to_save=["lm_head"])
    return {"root": root, "base": base, "other": other, "plain": plain, "rslora": rslora}


def load_out(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_close(got: dict, want: dict, rel: float = 1e-6):
    assert set(got) == set(want), set(got) ^ set(want)
    for k, w in want.items():
        g = got[k]
        scale = w.abs().max().clamp(min=1e-30)
        assert ((g.double() - w.double()).abs() <= rel * scale).all(), (k, (g - w).abs().max().item())


@pytest.mark.parametrize("adapter", ["plain", "rslora"])
@pytest.mark.parametrize("weight", [1.0, 0.25])
def test_lora_source_equals_peft_merge_and_unload(setup, adapter, weight):
    out = setup["root"] / f"out-{adapter}-{weight}"
    cfg = {"merge_method": "passthrough", "dtype": "float32",
           "models": [{"model": str(setup["base"]), "lora": {"path": str(setup[adapter]), "weight": weight}}]}
    run_merge(cfg, out)
    got = load_out(out)
    base = load_file(setup["base"] / "model.safetensors")
    changed = {k for k in got if not torch.equal(got[k], base[k])}
    expect = {"plain": {"q_proj", "v_proj", "up_proj"}, "rslora": {"o_proj", "down_proj", "embed_tokens", "lm_head"}}
    assert {k.split(".")[-2] for k in changed} == expect[adapter]
    if adapter == "rslora" and weight != 1.0:
        # modules_to_save tensors are replaced by peft at any weight; releaser interpolates towards them
        saved = load_file(setup[adapter] / "adapter_model.safetensors")["base_model.model.lm_head.weight"]
        assert torch.allclose(got.pop("lm_head.weight"), base["lm_head.weight"] + weight * (saved - base["lm_head.weight"]))
        want = peft_merged(setup["base"], setup[adapter], weight)
        want.pop("lm_head.weight")
    else:
        want = peft_merged(setup["base"], setup[adapter], weight)
    assert_close(got, want)


def test_lora_source_in_a_merge_and_in_slices(setup):
    """A LoRA source beside a plain model: the same as merging peft's merged copy."""
    merged_copy = setup["root"] / "peft-copy"
    if not merged_copy.exists():
        state = peft_merged(setup["base"], setup["plain"], 0.25)
        merged_copy.mkdir()
        shutil.copy(setup["base"] / "config.json", merged_copy / "config.json")
        save_file({k: v.contiguous() for k, v in state.items()}, merged_copy / "model.safetensors")
    b, o, p = str(setup["base"]), str(setup["other"]), str(setup["plain"])
    lora = {"path": p, "weight": 0.25}
    ours = {"merge_method": "slerp", "base_model": o, "parameters": {"t": 0.4}, "dtype": "float32",
            "slices": [{"sources": [{"model": o, "layer_range": [0, LAYERS]},
                                    {"model": b, "lora": lora, "layer_range": [0, LAYERS]}]}]}
    ref = {"merge_method": "slerp", "base_model": o, "parameters": {"t": 0.4}, "dtype": "float32",
           "models": [{"model": o}, {"model": str(merged_copy)}]}
    run_merge(ours, setup["root"] / "slices-ours")
    run_merge(ref, setup["root"] / "slices-ref")
    assert_close(load_out(setup["root"] / "slices-ours"), load_out(setup["root"] / "slices-ref"))


MERGEKIT_SCRIPT = textwrap.dedent("""
    import json, sys
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    jobs = json.load(open(sys.argv[1]))
    for out, cfg, cache in jobs:
        options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lora_merge_cache=cache)
        run_merge(MergeConfiguration.model_validate(cfg), out, options)
""")


@pytest.mark.slow
def test_model_plus_adapter_equals_mergekit(setup):
    root = setup["root"]
    b, o = str(setup["base"]), str(setup["other"])
    cfgs = {
        "linear": {"merge_method": "linear", "dtype": "float32",
                   "models": [{"model": f"{b}+{setup['plain']}", "parameters": {"weight": 0.6}},
                              {"model": o, "parameters": {"weight": 0.4}}]},
        "ties": {"merge_method": "ties", "base_model": o, "dtype": "float32",
                 "models": [{"model": o}, {"model": f"{b}+{setup['rslora']}",
                                           "parameters": {"weight": 0.7, "density": 0.5}}]},
    }
    jobs = [(str(root / "mk" / n), c, str(root / "lora-cache")) for n, c in cfgs.items()]
    (root / "jobs.json").write_text(json.dumps(jobs))
    (root / "run_mergekit.py").write_text(MERGEKIT_SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(root / "run_mergekit.py"), str(root / "jobs.json")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name, cfg in cfgs.items():
        path = root / f"cfg-{name}.yml"
        path.write_text(yaml.safe_dump(cfg))
        run_merge(path, root / "ours" / name)
        assert_close(load_out(root / "ours" / name), load_out(root / "mk" / name))


# ------------------------------------------------------------------------------------------------------- bad input

def cli_error(tmp_path, cfg) -> str:
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["merge", str(path), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code != 0
    text = result.output.strip()
    assert text.startswith("error:") and len(text.splitlines()) == 1 and "Traceback" not in text, text
    assert not (tmp_path / "out").exists()
    return text


def lora_cfg(setup, adapter) -> dict:
    return {"merge_method": "passthrough", "models": [{"model": str(setup["base"]), "lora": {"path": str(adapter)}}]}


def copy_adapter(setup, tmp_path, name="ad") -> Path:
    dst = tmp_path / name
    shutil.copytree(setup["plain"], dst)
    return dst


def test_adapter_for_another_model_size(setup, tmp_path):
    wide = tiny_model(tmp_path / "wide", seed=0, layers=LAYERS, intermediate=96)
    text = cli_error(tmp_path, {"merge_method": "passthrough",
                                "models": [{"model": str(wide), "lora": {"path": str(setup["plain"])}}]})
    assert "does not fit" in text and "up_proj" in text and "[128, 64]" in text


def test_adapter_targeting_missing_modules(setup, tmp_path):
    shallow = tiny_model(tmp_path / "shallow", seed=0, layers=LAYERS - 1)
    text = cli_error(tmp_path, {"merge_method": "passthrough",
                                "models": [{"model": str(shallow), "lora": {"path": str(setup["plain"])}}]})
    assert f"layers.{LAYERS - 1}" in text and "does not have" in text


def test_adapter_folder_without_its_files(setup, tmp_path):
    ad = copy_adapter(setup, tmp_path)
    (ad / "adapter_model.safetensors").unlink()
    assert "has no adapter_model.safetensors" in cli_error(tmp_path, lora_cfg(setup, ad))
    ad2 = copy_adapter(setup, tmp_path, "ad2")
    (ad2 / "adapter_config.json").unlink()
    assert "has no adapter_config.json" in cli_error(tmp_path, lora_cfg(setup, ad2))
    assert "not found" in cli_error(tmp_path, lora_cfg(setup, tmp_path / "missing"))


def test_dora_and_other_adapter_types_are_refused(setup, tmp_path):
    ad = copy_adapter(setup, tmp_path)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    assert "DoRA" in cli_error(tmp_path, lora_cfg(setup, ad)) 
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    assert "IA3 adapter" in cli_error(tmp_path, lora_cfg(setup, ad))


def test_rank_mismatch_between_config_and_weights(setup, tmp_path):
    ad = copy_adapter(setup, tmp_path)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {}}))   # v_proj has rank 2, not 4
    assert "rank 2" in cli_error(tmp_path, lora_cfg(setup, ad))


def test_lora_given_twice_or_badly(setup, tmp_path):
    cfg = lora_cfg(setup, setup["plain"])
    cfg["models"][0]["model"] += f"+{setup['plain']}"
    assert "keep one of them" in cli_error(tmp_path, cfg)
    cfg = {"merge_method": "passthrough", "models": [{"model": "a+b+c"}]}
    assert "one '+'" in cli_error(tmp_path, cfg)


def test_card_lists_the_lora_and_its_weight(tmp_path):
    from releaser.card.facts import merge_facts

    (tmp_path / "mergekit_config.yml").write_text(yaml.safe_dump({
        "merge_method": "linear", "models": [
            {"model": "org/base", "lora": {"path": "org/limarp", "weight": 0.25}, "parameters": {"weight": 1}},
            {"model": "org/other", "parameters": {"weight": 1}}]}))
    facts = merge_facts(tmp_path)
    assert [(l.lora.ref, l.model.ref) for l in facts.loras] == [("org/limarp", "org/base")]
    assert "LoRA weight 0.25" in facts.loras[0].lora.details
    assert facts.hub_models == ["org/base", "org/limarp", "org/other"]


def test_fan_in_fan_out_adapter(setup, tmp_path):
    """Conv1D-style adapters (weights stored as [in, out]): the update is (B @ A) transposed."""
    ad = tmp_path / "fifo"
    ad.mkdir()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 128, generator=g), torch.randn(64, 2, generator=g)
    key = "base_model.model.model.layers.1.mlp.up_proj"
    save_file({f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}, ad / "adapter_model.safetensors")
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 3,
                                                         "fan_in_fan_out": True, "target_modules": ["up_proj"]}))
    cfg = {"merge_method": "passthrough", "models": [{"model": str(setup["base"]),
                                                      "lora": {"path": str(ad), "weight": 0.5}}]}
    run_merge(cfg, tmp_path / "out")
    got = load_out(tmp_path / "out")
    base = load_file(setup["base"] / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.allclose(got[name], base[name] + 0.5 * 1.5 * (b @ a).T, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(got[k], base[k]) for k in base if k != name)


@pytest.mark.slow
def test_shipped_demo_adapter_fits_smollm2(smollm2):
    """recipes/lora/smollm2-shiplog-lora (the demo's fine-tune) folds into SmolLM2-135M-Instruct's attention."""
    from releaser.checkpoint import CheckpointReader
    from releaser.merge.lora import LoraAdapter, LoraReader

    folder = Path(__file__).resolve().parents[1] / "recipes" / "lora" / "smollm2-shiplog-lora"
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    state = load_file(folder / "adapter_model.safetensors")
    with CheckpointReader(smollm2) as reader:
        lora = LoraReader(reader, LoraAdapter(folder, 0.25), "SmolLM2")
        layers = reader.config["num_hidden_layers"]
        assert len(lora.updates) == 4 * layers
        assert {k.split(".")[-2] for k in lora.updates} == {"q_proj", "k_proj", "v_proj", "o_proj"}
        name = "model.layers.7.self_attn.v_proj"
        a = state[f"base_model.model.{name}.lora_A.weight"]
        b = state[f"base_model.model.{name}.lora_B.weight"]
        scale = cfg["lora_alpha"] / cfg["r"]
        want = reader.read(f"{name}.weight") + 0.25 * scale * (b @ a)
        assert torch.allclose(lora.read(f"{name}.weight"), want, rtol=1e-5, atol=1e-6)
        assert torch.count_nonzero(b) > 0   # trained, not the zero initialisation
