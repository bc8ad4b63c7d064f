"""`gguf: {imatrix: auto}`: a release computes the importance matrix once (its own stage and fingerprint), quantizes
with it, publishes it in the GGUF repo and says so in the card; an unchanged rerun does nothing."""

from __future__ import annotations

import json

import shutil

from safety_helpers import run as _run

from releaser.gguf.reader import GGUFFile
from releaser_testing import tiny_model


def test_imatrix_auto(smollm2, tmp_path):
    model = tiny_model(tmp_path / "model", vocab=49152)
    for f in ("tokenizer.json", "tokenizer_config.json"):   # a BPE vocabulary the GGUF export takes
        shutil.copy(smollm2 / f, model / f)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: me/Tiny\ndescription: A tiny release.\nstop_audit: false\nmodel: {model}\ntokenizer: {{template: chatml}}\n"
                      "gguf: {quants: [Q4_K_M, Q8_0], imatrix: auto}\nquality: false\n")
    work = tmp_path / "work"
    code, output = _run("release", recipe, "-o", work)
    assert code == 0, output
    stages = json.loads((work / "release.json").read_text())["stages"]
    assert {"imatrix", "gguf"} <= set(stages), list(stages)
    computed = work / "imatrix" / "Tiny-imatrix.gguf"
    published = work / "Tiny-GGUF" / "Tiny.imatrix"
    assert published.read_bytes() == computed.read_bytes()
    assert "Tiny.imatrix" in {f["path"] for f in stages["gguf"]["files"]}
    for quant in ("Q4_K_M", "Q8_0"):
        values = GGUFFile(work / "Tiny-GGUF" / f"Tiny-{quant}.gguf").values
        assert values["quantize.imatrix.file"] == "Tiny-imatrix.gguf"
    card = (work / "Tiny-GGUF" / "README.md").read_text()
    assert "Made with an importance matrix" in card and "`Tiny.imatrix` in this repo" in card, card
    assert (work / "published" / "me" / "Tiny-GGUF" / "Tiny.imatrix").is_file()
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file() and p.name != "release.json"}
    code, output = _run("release", recipe, "-o", work)
    assert code == 0, output
    assert {p: p.stat().st_mtime_ns for p in before} == before   # nothing made again
    # a recipe naming another file re-runs the GGUF stage only
    recipe.write_text(recipe.read_text().replace("imatrix: auto", f"imatrix: {computed}"))
    code, output = _run("check", recipe)
    assert code == 0, output
