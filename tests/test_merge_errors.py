"""Bad input: one-line errors naming the problem, a non-zero exit, nothing written, inputs untouched."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from releaser.checkpoint import safetensors_io
from releaser.cli import app
from releaser_testing import tiny_model

runner = CliRunner()


@pytest.fixture()
def models(tmp_path):
    return tiny_model(tmp_path / "a", seed=1), tiny_model(tmp_path / "b", seed=2)


def slerp_cfg(a, b, **extra):
    cfg = {"merge_method": "slerp", "base_model": str(a), "parameters": {"t": 0.5},
           "models": [{"model": str(a)}, {"model": str(b)}]}
    cfg.update(extra)
    return cfg


def run_cli(tmp_path, cfg, *args, out="out"):
    path = tmp_path / "cfg.yml"
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    result = runner.invoke(app, ["merge", str(path), str(tmp_path / out), "--quiet", *args])
    return result


def assert_one_line_error(result, *needles):
    assert result.exit_code != 0
    text = result.output.strip()
    assert text.startswith("error:"), text
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    for needle in needles:
        assert needle in text, text


def assert_nothing_written(tmp_path):
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_yaml_syntax_error(tmp_path, models):
    result = run_cli(tmp_path, "merge_method: slerp\nmodels: [\n  - model: a\n")
    assert_one_line_error(result, "not valid YAML", "line")
    assert_nothing_written(tmp_path)


def test_unknown_method(tmp_path, models):
    result = run_cli(tmp_path, dict(slerp_cfg(*models), merge_method="slurp"))
    assert_one_line_error(result, "slurp", "merge_method", "linear")
    assert_nothing_written(tmp_path)


def test_missing_required_parameter(tmp_path, models):
    cfg = slerp_cfg(*models)
    del cfg["parameters"]
    assert_one_line_error(run_cli(tmp_path, cfg), "`t`")
    assert_nothing_written(tmp_path)


def test_base_not_among_models_for_slerp(tmp_path, models):
    c = tiny_model(tmp_path / "c", seed=3)
    result = run_cli(tmp_path, slerp_cfg(*models, base_model=str(c)))
    assert_one_line_error(result, "slerp")
    assert_nothing_written(tmp_path)


def test_bad_field_names_yaml_path(tmp_path, models):
    cfg = slerp_cfg(*models)
    cfg["models"][1]["paramters"] = {"weight": 1}
    assert_one_line_error(run_cli(tmp_path, cfg), "models[1].paramters")
    cfg = slerp_cfg(*models, dtype="float8")
    assert_one_line_error(run_cli(tmp_path, cfg), "dtype")
    assert_nothing_written(tmp_path)


def test_model_missing_or_without_weights(tmp_path, models):
    a, b = models
    assert_one_line_error(run_cli(tmp_path, slerp_cfg(a, tmp_path / "nope")), "nope", "not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((a / "config.json").read_text())
    assert_one_line_error(run_cli(tmp_path, slerp_cfg(a, empty)), "has no weights")
    assert_nothing_written(tmp_path)


def test_shape_mismatch(tmp_path, models):
    a, _ = models
    wide = tiny_model(tmp_path / "wide", seed=2, intermediate=96)
    assert_one_line_error(run_cli(tmp_path, slerp_cfg(a, wide)), "shape mismatch", "mlp")
    assert_nothing_written(tmp_path)


def test_unsupported_architecture(tmp_path, models):
    a, b = models
    cfg_path = b / "config.json"
    cfg_path.write_text(cfg_path.read_text().replace("LlamaForCausalLM", "GPT2LMHeadModel"))
    assert_one_line_error(run_cli(tmp_path, slerp_cfg(a, b)), "GPT2LMHeadModel", "LlamaForCausalLM")


def test_layer_range_out_of_bounds(tmp_path, models):
    a, b = models
    cfg = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(a), "layer_range": [0, 2]}]},
                                                      {"sources": [{"model": str(b), "layer_range": [2, 9]}]}]}
    assert_one_line_error(run_cli(tmp_path, cfg), "slices[1].sources[0].layer_range", "4 layers")
    assert_nothing_written(tmp_path)


def test_out_dir_exists_without_overwrite(tmp_path, models):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert_one_line_error(run_cli(tmp_path, slerp_cfg(*models)), "--overwrite")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_output_may_not_replace_an_input(tmp_path, models):
    a, b = models
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(slerp_cfg(a, b)))
    result = runner.invoke(app, ["merge", str(path), str(a), "--overwrite", "--quiet"])
    assert_one_line_error(result, "input model")
    assert (a / "model.safetensors").exists()


def test_write_error_mid_merge_leaves_nothing(tmp_path, models, monkeypatch):
    real = safetensors_io.write_at
    calls = {"n": 0}

    def failing(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 12:  # after the headers and a few tensors
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(safetensors_io, "write_at", failing)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("previous release")
    result = run_cli(tmp_path, slerp_cfg(*models), "--overwrite")
    assert_one_line_error(result, "disk space")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"], "the old output must survive"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_disk_full_in_a_real_process(tmp_path, models):
    """RLIMIT_FSIZE makes the OS refuse the write (EFBIG), like a full disk: the subprocess prints one line."""
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(slerp_cfg(*models)))
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000)); "
            "from releaser.cli import app; sys.argv = ['releaser'] + sys.argv[1:]; app()")
    proc = subprocess.run([sys.executable, "-c", code, "merge", str(path), str(tmp_path / "out"), "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert err.startswith("error:") and "disk space" in err and len(err.splitlines()) == 1, err
    assert_nothing_written(tmp_path)


def test_cuda_without_gpu_or_unknown_device(tmp_path, models, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert_one_line_error(run_cli(tmp_path, slerp_cfg(*models), "--device", "cuda"), "no CUDA GPU", "--device cpu")
    assert_one_line_error(run_cli(tmp_path, slerp_cfg(*models), "--device", "tpu"), "unknown device")
    assert_nothing_written(tmp_path)
