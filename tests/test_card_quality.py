"""Cards with measured quality: the GGUF files table gains PPL/KLD/same-top columns, the AWQ card a quality line, each
naming the text and context size; the pick guide uses the figures. Without a report the cards are unchanged."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from releaser.card import render_card
from releaser.cli import app
from releaser.errors import ConfigError
from releaser.recipe import load_recipe
from releaser_testing import tiny_awq, tiny_gguf

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("RELEASER_UPDATE_GOLDEN") == "1"
TEXT = "Darwin, On the Origin of Species (1859), introduction and chapter I"


def row(file, kind, quant, ppl, kld, same):
    return {"file": file, "path": f"/out/{file}", "kind": kind, "quant": quant, "size": 1000, "ppl": ppl,
            "tokens": 2040, "windows": 8, "kld_mean": kld, "kld_p99": kld * 5, "kld_max": kld * 12,
            "same_top": same, "ppl_ratio": ppl / 25.9086, "max_kld": 0.2, "backend": "torch", "seconds": 10.0}


REPORT = {
    "version": 1, "text": {"name": TEXT, "sha256": "0" * 64, "tokens": 7700}, "ctx": 512, "chunks": 8,
    "scored_tokens": 2040, "numerics": "llama.cpp",
    "model": {"path": "/out/model", "ppl": 25.9086, "tokens": 2040, "windows": 8},
    "artefacts": [row("Tiny-Merge-F16.gguf", "gguf", "F16", 25.9100, 0.0000014, 0.9985),
                  row("Tiny-Merge-Q8_0.gguf", "gguf", "Q8_0", 26.0035, 0.0011420, 0.9819),
                  row("awq", "awq", "AWQ", 26.8812, 0.0310000, 0.9012)],
    "stop_test": None, "gate": {"enabled": True, "passed": True, "failures": []}, "seconds": 100.0,
}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release-q")
    gguf = root / "gguf"
    gguf.mkdir()
    for quant in ("F16", "Q8_0", "Q4_0"):
        tiny_gguf(gguf / f"Tiny-Merge-{quant}.gguf", quant, seed=1, name="Tiny Merge")
    report = root / "quality.json"
    report.write_text(json.dumps(REPORT))
    return {"gguf": gguf, "awq": tiny_awq(root / "awq", seed=1), "report": report}


@pytest.fixture(scope="module")
def recipe():
    return load_recipe(GOLDEN / "card_recipe.yml")


def test_golden_cards_with_quality(release, recipe):
    for kind in ("gguf", "awq"):
        text = render_card(release[kind], recipe, quality=release["report"])
        golden = GOLDEN / f"card_{kind}_quality.md"
        if UPDATE:
            golden.write_text(text)
        assert text == golden.read_text(), f"{golden} differs: rerun with RELEASER_UPDATE_GOLDEN=1 and review the diff"


def test_gguf_table_has_the_figures(release, recipe):
    text = render_card(release["gguf"], recipe, quality=REPORT)
    assert "| File | Quant type | Size | Bits per weight | PPL | Mean KLD | 99% KLD | Same top | Good for |" in text
    rows = {m[0]: m[1:] for m in re.findall(r"(?m)^\| \[(\S+\.gguf)\]\(\S+\) \| \w+ \| [^|]+ \| [\d.]+ \| "
                                            r"([^|]+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|", text)}
    assert rows["Tiny-Merge-F16.gguf"] == ("25.910", "1.4e-06", "7.0e-06", "99.9%")
    assert rows["Tiny-Merge-Q8_0.gguf"] == ("26.003", "0.0011", "0.0057", "98.2%")
    assert rows["Tiny-Merge-Q4_0.gguf"] == ("not measured",) * 4
    assert f"on {TEXT}, 8 windows of 512 tokens (2040 scored tokens" in text
    assert "perplexity 25.909" in text
    assert "as llama.cpp on a CPU computes them" in text and "llama-perplexity --kl-divergence" in text
    older = {k: v for k, v in REPORT.items() if k != "numerics"}   # a report from before `numerics`: float32
    text = render_card(release["gguf"], recipe, quality=older)
    assert "as dequantized weights and float32 activations compute them" in text, text


def test_pick_guide_uses_the_figures(release, recipe):
    text = render_card(release["gguf"], recipe, quality=REPORT)
    assert re.search(r"Start with \*\*Q8_0\*\* \(`Tiny-Merge-Q8_0.gguf`, [\d.]+ KB: mean KLD 0.0011, the same top token "
                     r"as the unquantized model 98.2% of the time\)", text)
    # the recommended file is already the smallest near-original one: no second pick
    assert "The smallest file measured within" not in text
    other = dict(REPORT, artefacts=[dict(r, kld_mean=0.05) if r["quant"] == "Q8_0" else r
                                    for r in REPORT["artefacts"]])
    text = render_card(release["gguf"], recipe, quality=other)
    assert ("The smallest file measured within a mean KLD of 0.01 of the unquantized model is **F16** "
            "(`Tiny-Merge-F16.gguf`") in text


def test_awq_card_has_the_quality_line(release, recipe):
    text = render_card(release["awq"], recipe, quality=release["report"])
    assert (f"| Measured quality | PPL 26.881 (unquantized 25.909), mean KLD 0.0310, same top token 90.1%; on {TEXT}, "
            "8 windows of 512 tokens (2040 scored tokens: the second half of each window) |") in text


def test_cards_without_matching_figures_stay_as_today(release, recipe):
    for kind in ("gguf", "awq"):
        plain = render_card(release[kind], recipe)
        assert render_card(release[kind], recipe, quality=dict(REPORT, artefacts=[])) == plain
        assert plain == (GOLDEN / f"card_{kind}.md").read_text()


def test_bad_reports(release, tmp_path):
    with pytest.raises(ConfigError, match="does not exist; make it with releaser eval"):
        render_card(release["gguf"], quality=tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('{"artefacts": [{"file": "x"}]}')
    with pytest.raises(ConfigError, match="is not a releaser quality report"):
        render_card(release["gguf"], quality=tmp_path / "bad.json")


def test_card_cli_quality_option(release, tmp_path):
    out = tmp_path / "README.md"
    res = CliRunner().invoke(app, ["card", str(release["gguf"]), "--quality", str(release["report"]), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "| PPL | Mean KLD | 99% KLD | Same top |" in out.read_text()
