"""The CLI through Typer's runner and as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from releaser.cli import app
from releaser_testing import tiny_model

BIN = Path(sys.executable).parent / "releaser"


def test_help_reads_well():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "merge" in result.output
    result = CliRunner().invoke(app, ["merge", "--help"])
    assert result.exit_code == 0
    for option in ("--device", "--overwrite", "--shard-size", "CONFIG", "OUT_DIR"):
        assert option in result.output


def test_merge_subprocess_prints_summary(tmp_path):
    tiny_model(tmp_path / "a", seed=1), tiny_model(tmp_path / "b", seed=2)
    cfg = {"merge_method": "slerp", "base_model": "a", "parameters": {"t": 0.3}, "dtype": "bfloat16",
           "models": [{"model": "a"}, {"model": "b"}]}  # paths relative to the config file
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, COLUMNS="200")
    proc = subprocess.run([str(BIN), "merge", str(tmp_path / "cfg.yml"), str(tmp_path / "out"), "--device", "auto"],
                          capture_output=True, text=True, timeout=300, env=env, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert "merged 39 tensors" in proc.stdout and "slerp" in proc.stdout and str(tmp_path / "out") in proc.stdout
    assert (tmp_path / "out" / "model.safetensors").exists()
    proc = subprocess.run([str(BIN), "merge", str(tmp_path / "cfg.yml"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0 and proc.stderr.startswith("error:") and "--overwrite" in proc.stderr
