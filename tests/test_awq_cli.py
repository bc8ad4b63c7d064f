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
    held = tmp_path / "held.jsonl"
    held.write_text("\n".join(json.dumps({"text": " ".join(f"w{rng.randrange(150)}" for _ in range(50))})
                              for _ in range(10)))
    out = tmp_path / "awq"
    result = CliRunner().invoke(app, ["awq", str(model), "-o", str(out), "--calib", str(calib), "--samples", "24",
                                      "--seqlen", "64", "--group-size", "64", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "AWQ 4-bit g64" in result.output and str(out) in result.output
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 64
    result = CliRunner().invoke(app, ["awq-eval", str(model), str(out), "--text", str(held), "--seqlen", "64",
                                      "--rows", "4"])
    assert result.exit_code == 0, result.output
    assert "perplexity unquantized" in result.output and "KL" in result.output
    saved = json.loads((out / "awq_calibration.json").read_text())
    assert saved["samples"] == 24 and saved["eval"]["rows"] == 4 and saved["eval"]["text"] == "held.jsonl"
    ppl = saved["eval"]["perplexity"]
    assert set(ppl) == {"unquantized", "awq", "rtn"} and all(v > 1 for v in ppl.values())
    assert saved["eval"]["kl_awq"] >= 0
