"""``releaser merge --dry-run``: the plan per tensor group (method, sources, parameters per layer), nothing written."""

from __future__ import annotations

import re

import pytest
import yaml
from typer.testing import CliRunner

from releaser.cli import app
from releaser.merge.describe import dry_run
from releaser_testing import noised_variant, tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("dry")
    a = tiny_model(root / "a", seed=0)
    return str(a), str(noised_variant(a, root / "b", seed=1))


def test_gradient_visible_per_layer(pair):
    a, b = pair
    cfg = {"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": b}],
           "parameters": {"t": [{"filter": "self_attn", "value": {0: 0.9, 3: 0.0}}, {"value": 0.5}]}}
    lines = dry_run(cfg)
    assert lines[0].startswith("merge_method slerp (SLERP): 2 models, 4 output layers, 39 tensors")
    assert lines[1].endswith(f"{a} (base)") and lines[2].endswith(b)
    attn = [line for line in lines if "self_attn.q_proj" in line]
    assert [re.search(r"t=([\d.]+)", line).group(1) for line in attn] == ["0.9", "0.6", "0.3", "0"]
    assert [line.split(":")[0] for line in attn] == [f"layer {i}" for i in range(4)]
    assert all("t=0.5" in line for line in lines[3:] if "self_attn" not in line)


def test_per_model_parameters_sources_and_slices(pair):
    a, b = pair
    lines = dry_run({"merge_method": "ties", "base_model": a, "models": [
        {"model": a}, {"model": b, "parameters": {"weight": [1, 0.5], "density": 0.5}}]})
    assert "[0] base; [1] weight=1 density=0.5 | int8_mask=false normalize=true rescale=false lambda=1" in lines[3]
    assert "weight=0.5 density=0.5" in lines[-1]
    lines = dry_run({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 2]}]}, {"sources": [{"model": b, "layer_range": [1, 3]}]}]})
    assert any(line.startswith("layer 2:") and line.endswith("<- [1]@1") for line in lines), lines
    assert any(line.startswith("layer 1:") and line.endswith("<- [0]") for line in lines), lines


def test_cli_dry_run_writes_nothing(pair, tmp_path):
    a, b = pair
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": a, "parameters": {"weight": [{"filter": "mlpp", "value": 1.0}, {"value": 0.3}]}},
        {"model": b, "parameters": {"weight": 0.7}}]}))
    result = runner.invoke(app, ["merge", str(cfg), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "merge_method linear (Linear)" in result.output and "[0] weight=0.3; [1] weight=0.7" in result.output
    assert "warning:" in result.output and "mlpp" in result.output
    result = runner.invoke(app, ["merge", str(cfg), str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 0 and not (tmp_path / "out").exists()
    result = runner.invoke(app, ["merge", str(cfg)])
    assert result.exit_code != 0 and "OUT_DIR" in result.output
