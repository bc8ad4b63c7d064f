"""`releaser awq` and `releaser awq-eval` on a tiny model through the CLI: summaries, files, saved figures."""

from __future__ import annotations

import json
import random

from typer.testing import CliRunner

from releaser.cli import app
from releaser_testing import tiny_model, tiny_tokenizer


def test_awq_then_awq_eval(tmp_path):
    model = tiny_model(tmp_path / "m", layers=2, hidden=128, intermediate=256)
    tiny_tokenizer(model)
    rng = random.Random(0)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(" ".join(f"w{rng.randrange(150)}" for _ in range(30)) for _ in range(40)))
    held = tmp_path / "held.txt"
    held.write_text("\n\n".join(" ".join(f"w{rng.randrange(150)}" for _ in range(50)) for _ in range(10)))
    out = tmp_path / "awq"
    result = CliRunner().invoke(app, ["awq", str(model), "-o", str(out), "--calib", str(calib), "--samples", "24",
                                      "--seqlen", "64", "--group-size", "64", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "AWQ 4-bit g64" in result.output and str(out) in result.output
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 64
    result = CliRunner().invoke(app, ["awq-eval", str(model), str(out), "--text", str(held), "--ctx", "64",
                                      "--chunks", "4", "-q"])
    assert result.exit_code == 0, result.output
    assert "perplexity unquantized" in result.output and "mean KLD AWQ" in result.output
    saved = json.loads((out / "awq_calibration.json").read_text())["eval"]
    assert saved["chunks"] == 4 and saved["ctx"] == 64 and saved["text"] == "held.txt"
    assert saved["tokens"] == 4 * 31   # the second half of each window is scored, as releaser eval and llama.cpp do
    ppl = saved["perplexity"]
    assert set(ppl) == {"unquantized", "awq", "rtn"} and all(v > 1 for v in ppl.values())
    assert saved["kld_mean"]["awq"] >= 0 and saved["kld_mean"]["rtn"] > 0
    # the old flag names still work
    result = CliRunner().invoke(app, ["awq-eval", str(model), str(out), "--text", str(held), "--seqlen", "64",
                                      "--rows", "2", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "awq_calibration.json").read_text())["eval"]["chunks"] == 2
