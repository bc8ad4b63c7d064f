"""The merge engine, config handling and checkpoint I/O, end to end on tiny random models."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from releaser.checkpoint import CheckpointReader
from releaser.merge import run_merge
from releaser.merge.config import evaluate, parse_config
from releaser_testing import tiny_model


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(f))
    return out


@pytest.fixture()
def pair(tmp_path):
    a = tiny_model(tmp_path / "a", seed=1)
    b = tiny_model(tmp_path / "b", seed=2, shard_bytes=60_000)  # a sharded input
    return a, b


def test_gradient_and_filter_evaluation():
    grad = [0, 0.5, 0.3, 0.7, 1]
    assert evaluate(grad, "x", 0.0) == 0
    assert evaluate(grad, "x", 1.0) == 1
    # mergekit's example: layer 20 of 40 -> t = 20/39, s = 2.051..., 0.3 + 0.051 * 0.4
    assert evaluate(grad, "x", 20 / 39) == pytest.approx(0.3 + (20 / 39 * 4 - 2) * 0.4)
    cfg, _ = parse_config({"merge_method": "slerp", "models": [{"model": "a"}, {"model": "b"}], "parameters": {
        "t": [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.25}, {"value": 0.5}]}})
    t = cfg.parameters["t"]
    assert evaluate(t, "model.layers.3.self_attn.q_proj.weight", 0.5) == 0.5
    assert evaluate(t, "model.layers.3.mlp.up_proj.weight", 0.9) == 0.25
    assert evaluate(t, "model.norm.weight", 0.0) == 0.5
    assert evaluate([True, False], "x", 0.6) is True


def test_linear_merge_streams_sharded_output(pair, tmp_path):
    a, b = pair
    before = digest(a), digest(b)
    cfg = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": str(a), "parameters": {"weight": 0.25}}, {"model": str(b), "parameters": {"weight": 0.75}}]}
    result = run_merge(cfg, tmp_path / "out", max_shard_bytes=100_000)
    out = tmp_path / "out"
    assert (digest(a), digest(b)) == before, "inputs must never be modified"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n > 1 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    merged = load_all(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    assert set(merged) == set(ra.tensors)
    for name, t in merged.items():
        torch.testing.assert_close(t, 0.25 * ra.read(name) + 0.75 * rb.read(name), rtol=1e-6, atol=1e-7)
    assert result.tensors == len(merged) and not list(tmp_path.glob(".out.*"))
    assert yaml.safe_load((out / "mergekit_config.yml").read_text())["merge_method"] == "linear"


def test_passthrough_frankenmerge_renumbers_layers(tmp_path):
    a = tiny_model(tmp_path / "a", seed=1, layers=4)
    b = tiny_model(tmp_path / "b", seed=2, layers=4)
    cfg = {"merge_method": "passthrough", "dtype": "bfloat16", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(b), "layer_range": [1, 4]}]}]}
    run_merge(cfg, tmp_path / "out")
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and config["torch_dtype"] == "bfloat16"  # the key tiny models use
    merged = load_all(out)
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    q = "self_attn.q_proj.weight"
    assert torch.equal(merged[f"model.layers.2.{q}"], ra.read(f"model.layers.2.{q}").bfloat16())
    assert torch.equal(merged[f"model.layers.3.{q}"], rb.read(f"model.layers.1.{q}").bfloat16())
    assert torch.equal(merged[f"model.layers.5.{q}"], rb.read(f"model.layers.3.{q}").bfloat16())
    assert torch.equal(merged["model.embed_tokens.weight"], ra.read("model.embed_tokens.weight").bfloat16())
    assert torch.equal(merged["lm_head.weight"], rb.read("lm_head.weight").bfloat16())
    assert all(t.dtype == torch.bfloat16 for t in merged.values())


def test_tied_and_bin_inputs(tmp_path):
    """A pytorch_model.bin input (weights_only) and tied embeddings (no lm_head tensor) merge like safetensors."""
    a = tiny_model(tmp_path / "a", seed=1, tied=True)
    b = tiny_model(tmp_path / "b", seed=2, tied=True)
    state = load_file(b / "model.safetensors")
    torch.save(state, b / "pytorch_model.bin")
    (b / "model.safetensors").unlink()
    cfg = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1.0}},
                                                 {"model": str(b), "parameters": {"weight": 1.0}}]}
    run_merge(cfg, tmp_path / "out")
    merged = load_all(tmp_path / "out")
    assert "lm_head.weight" not in merged
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    name = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(merged[name], (load_file(a / "model.safetensors")[name] + state[name]) / 2)


def test_mistral_head_dim_and_qwen2_bias(tmp_path):
    for arch, kw in (("mistral", {"head_dim": 32, "hidden": 64, "heads": 4}), ("qwen2", {})):
        a = tiny_model(tmp_path / f"{arch}-a", arch=arch, seed=1, **kw)
        b = tiny_model(tmp_path / f"{arch}-b", arch=arch, seed=2, **kw)
        cfg = {"merge_method": "slerp", "base_model": str(a), "parameters": {"t": 0.5},
               "models": [{"model": str(a)}, {"model": str(b)}]}
        run_merge(cfg, tmp_path / f"{arch}-out")
        merged = load_all(tmp_path / f"{arch}-out")
        assert set(merged) == set(CheckpointReader(a).tensors)
        if arch == "mistral":
            assert merged["model.layers.0.self_attn.q_proj.weight"].shape == (128, 64)


def test_overwrite_replaces_atomically(pair, tmp_path):
    a, b = pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    cfg = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1}},
                                                 {"model": str(b), "parameters": {"weight": 1}}]}
    run_merge(cfg, out, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]


def test_random_methods_reproducible_per_seed(pair, tmp_path):
    a, b = pair
    c = tiny_model(tmp_path / "c", seed=3)

    def merge(seed, name):
        cfg = {"merge_method": "dare_ties", "base_model": str(a), "random_seed": seed,
               "parameters": {"density": 0.5, "weight": 0.5},
               "models": [{"model": str(a)}, {"model": str(b)}, {"model": str(c)}]}
        run_merge(cfg, tmp_path / name, workers=3)
        return load_all(tmp_path / name)

    one, two, other = merge(7, "o1"), merge(7, "o2"), merge(8, "o3")
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert any(not torch.equal(one[k], other[k]) for k in one)


def test_mixed_stored_dtypes_promote_and_parameters_are_typed(tmp_path):
    """With no `dtype`, inputs are cast to their promoted dtype (as mergekit does); string parameters are coerced."""
    a = tiny_model(tmp_path / "a", seed=1, dtype="float32")
    b = tiny_model(tmp_path / "b", seed=2, dtype="bfloat16")
    cfg = {"merge_method": "ties", "base_model": str(a), "parameters": {"normalize": "false", "density": "1"},
           "models": [{"model": str(a)}, {"model": str(b), "parameters": {"weight": "0.5"}}]}
    run_merge(cfg, tmp_path / "out")
    merged = load_all(tmp_path / "out")
    name = "model.layers.1.self_attn.o_proj.weight"
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    assert merged[name].dtype == torch.float32
    expected = ra.read(name) + 0.5 * (rb.read(name).float() - ra.read(name))  # normalize off: no division by 0.5
    torch.testing.assert_close(merged[name], expected)


def test_bad_parameter_type_is_a_config_error(pair, tmp_path):
    from releaser.errors import ConfigError

    a, b = pair
    cfg = {"merge_method": "slerp", "base_model": str(a), "parameters": {"t": "half"},
           "models": [{"model": str(a)}, {"model": str(b)}]}
    with pytest.raises(ConfigError, match="`t`.*must be a number"):
        run_merge(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting", ["chatml", "auto", "{% for m in messages %}{{ m['content'] }}{% endfor %}"])
def test_chat_template_setting(tmp_path, setting):
    from releaser_testing import CHATML_TEMPLATE, tiny_tokenizer
    from releaser.tokenizer.templates import load_template

    a, b = tiny_model(tmp_path / "a", seed=1), tiny_model(tmp_path / "b", seed=2)
    tiny_tokenizer(a)
    cfg = {"merge_method": "slerp", "base_model": str(a), "parameters": {"t": 0.5}, "chat_template": setting,
           "models": [{"model": str(a)}, {"model": str(b)}]}
    run_merge(cfg, tmp_path / "out")
    written = (tmp_path / "out" / "chat_template.jinja").read_text()
    expected = {"chatml": load_template("chatml").source, "auto": CHATML_TEMPLATE}.get(setting, setting)
    assert written == expected
    assert "chat_template" not in json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
