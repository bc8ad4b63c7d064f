"""AWQ bad input: one-line errors through the CLI, nothing written; plus a small end-to-end run on a tiny model."""

from __future__ import annotations

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from releaser.awq import AWQOptions, run_awq
from releaser.awq.pack import unpack
from releaser.cli import app
from releaser.errors import ConfigError, ModelError
from releaser.stage import Reporter
from releaser_testing import tiny_model, tiny_tokenizer


def _corpus(path, paragraphs=64, words=40, seed=0):
    rng = random.Random(seed)
    path.write_text("\n\n".join(" ".join(f"w{rng.randrange(200)}" for _ in range(words)) for _ in range(paragraphs)))
    return path


def _tiny(tmp_path, name="m", **kw):
    kw.setdefault("layers", 2)
    kw.setdefault("hidden", 128)
    kw.setdefault("intermediate", 256)
    path = tiny_model(tmp_path / name, **kw)
    tiny_tokenizer(path)
    return path


def _cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def _one_line_error(code, output, *needles):
    assert code != 0
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bits_other_than_four(tmp_path):
    code, output = _cli("awq", _tiny(tmp_path), "-o", tmp_path / "out", "--bits", "3")
    _one_line_error(code, output, "bits 3", "4")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError):
        AWQOptions(bits=8)


def test_unsupported_architecture_lists_supported(tmp_path):
    path = _tiny(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (path / "config.json").write_text(json.dumps(cfg))
    code, output = _cli("awq", path, "-o", tmp_path / "out")
    _one_line_error(code, output, "GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
    assert not (tmp_path / "out").exists()


def test_calibration_file_too_short(tmp_path):
    calib = _corpus(tmp_path / "calib.txt", paragraphs=5)
    code, output = _cli("awq", _tiny(tmp_path), "-o", tmp_path / "out", "--calib", calib, "--samples", "16",
                        "--seqlen", "64")
    _one_line_error(code, output, "too short", "5 usable samples", "--samples 16")
    assert not (tmp_path / "out").exists()


def test_calibration_file_bad_kinds(tmp_path):
    model = _tiny(tmp_path)
    (tmp_path / "c.csv").write_text("a,b\n")
    _one_line_error(*_cli("awq", model, "-o", tmp_path / "o", "--calib", tmp_path / "c.csv"), ".txt", ".jsonl")
    (tmp_path / "c.jsonl").write_text('{"text": "w1 w2"}\n{"body": "x"}\n')
    _one_line_error(*_cli("awq", model, "-o", tmp_path / "o", "--calib", tmp_path / "c.jsonl"), "line 2", '"text"')
    _one_line_error(*_cli("awq", model, "-o", tmp_path / "o", "--calib", tmp_path / "missing.txt"), "does not exist")


def test_width_with_no_usable_group_size(tmp_path):
    path = _tiny(tmp_path, hidden=40, intermediate=80, heads=4, kv_heads=4)
    code, output = _cli("awq", path, "-o", tmp_path / "out", "--calib", _corpus(tmp_path / "c.txt"))
    _one_line_error(code, output, "no usable AWQ group size", "hidden_size 40")


def test_tiny_end_to_end_jsonl_calibration(tmp_path, monkeypatch):
    """Qwen2 (q/k/v biases, no GQA): files, config, shapes, and a group-size fallback that is reported; the same
    bytes when the machine is busy (one thread instead of every core)."""
    model = _tiny(tmp_path, arch="qwen2", hidden=64, intermediate=128, heads=4, kv_heads=4)
    rng = random.Random(1)
    lines = [json.dumps({"text": " ".join(f"w{rng.randrange(200)}" for _ in range(15))}) for _ in range(40)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    messages = []

    class Collect(Reporter):
        def message(self, text):
            messages.append(text)

        warning = message

    result = run_awq(AWQOptions(calibration=str(tmp_path / "c.jsonl"), samples=32, seqlen=64), model,
                     tmp_path / "out", Collect())
    out = tmp_path / "out"
    assert any("using group size 64" in m for m in messages)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True,
                                          "version": "gemm", "modules_to_not_convert": ["lm_head"]}
    assert cfg["torch_dtype"] == "float16" and cfg["architectures"] == ["Qwen2ForCausalLM"]
    calib = json.loads((out / "awq_calibration.json").read_text())
    assert calib["dataset"] == "c.jsonl" and calib["samples"] == 32 and calib["seq_len"] == 64
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "quant_config.json"):
        assert (out / name).is_file(), name
    assert {f.path for f in result.files} >= {"model.safetensors", "config.json", "awq_calibration.json"}
    from safetensors.torch import load_file

    t = load_file(out / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight" not in t
    assert t["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.int32
    assert t["model.layers.0.self_attn.q_proj.qweight"].shape == (64, 8)
    assert t["model.layers.0.self_attn.q_proj.qzeros"].shape == (1, 8)
    assert t["model.layers.0.self_attn.q_proj.scales"].shape == (1, 64)
    assert t["model.layers.0.mlp.down_proj.qweight"].shape == (128, 8)
    assert t["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float16
    assert t["model.embed_tokens.weight"].dtype == torch.float16 and "lm_head.weight" in t
    codes = unpack(t["model.layers.1.mlp.up_proj.qweight"])
    assert int(codes.min()) == 0 and int(codes.max()) == 15
    # an existing output needs --overwrite
    with pytest.raises(Exception, match="--overwrite"):
        run_awq(AWQOptions(calibration=str(tmp_path / "c.jsonl"), samples=32, seqlen=64), model, out)
    threads = torch.get_num_threads()
    monkeypatch.setattr("os.getloadavg", lambda: (99.0, 99.0, 99.0))   # busier than it has cores: one thread
    try:
        busy = run_awq(AWQOptions(calibration=str(tmp_path / "c.jsonl"), samples=32, seqlen=64), model,
                       tmp_path / "busy")
    finally:
        torch.set_num_threads(threads)
    assert busy.facts["threads"] == 1
    assert {f.path: f.sha256 for f in busy.files} == {f.path: f.sha256 for f in result.files}


def test_already_quantized_input(tmp_path):
    from releaser_testing import tiny_awq

    path = tiny_awq(tmp_path / "q")
    with pytest.raises(ModelError, match="already quantized"):
        run_awq(AWQOptions(), path, tmp_path / "out")


def test_device_cuda_without_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="--device cuda"):
        run_awq(AWQOptions(device="cuda", calibration=str(_corpus(tmp_path / "c.txt")), samples=8, seqlen=64),
                _tiny(tmp_path), tmp_path / "out")
