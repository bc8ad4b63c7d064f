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


def test_searched_recipe_in_a_release(smollm2, tmp_path, llama_tools):
    """`imatrix:` says how auto computes the matrix; a `target` quant is searched with it, its file says what it was
    searched for and carries the rules that make it (llama-quantize given them and the matrix writes the same
    tensors), the manifest records the search, the card says so."""
    import subprocess

    import gguf_oracle as o
    from releaser.gguf import export_gguf

    model = tiny_model(tmp_path / "model", layers=2, hidden=256, intermediate=512, vocab=49152)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2 / f, model / f)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: me/Tiny\ndescription: A tiny release.\nstop_audit: false\nmodel: {model}\n"
                      "tokenizer: {template: chatml}\nimatrix: {chunks: 2, ctx: 64}\n"
                      "gguf: {quants: [Q4_K_M, {name: Q4_K_R, target: {bpw: 5.5}}], imatrix: auto}\nquality: false\n")
    work = tmp_path / "work"
    code, output = _run("release", recipe, "-o", work)
    assert code == 0, output
    assert GGUFFile(work / "imatrix" / "Tiny-imatrix.gguf").values["imatrix.chunk_count"] == 2
    search = json.loads((work / "release.json").read_text())["stages"]["gguf"]["facts"]["search"]["Q4_K_R"]
    assert search["target"] == "bpw=5.5" and 5.0 < search["bits_per_weight"] <= 5.5, search
    values = GGUFFile(work / "Tiny-GGUF" / "Tiny-Q4_K_R.gguf").values
    assert values["quantize.recipe.target"] == "bpw=5.5" and values["quantize.recipe.name"] == "Q4_K_R"
    assert values["quantize.recipe.args"][0] == "--tensor-type"
    card = (work / "Tiny-GGUF" / "README.md").read_text()
    assert "a type per tensor chosen for bpw=5.5 by measured sensitivity" in card, card
    f32 = export_gguf(model, tmp_path / "f32", ["F32"], name="Tiny").files["F32"][0]
    proc = subprocess.run([str(llama_tools / "llama-quantize"), "--imatrix", str(work / "Tiny-GGUF" / "Tiny.imatrix"),
                           *values["quantize.recipe.args"], str(f32), str(tmp_path / "ref.gguf"),
                           values["quantize.recipe.base"], "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    theirs, ours = o.tensors(tmp_path / "ref.gguf"), o.tensors(work / "Tiny-GGUF" / "Tiny-Q4_K_R.gguf")
    assert {k: v[0] for k, v in ours.items()} == {k: v[0] for k, v in theirs.items()}
    assert [k for k in ours if ours[k][1] != theirs[k][1]] == []
    assert len({v[0] for v in ours.values()}) > 2   # F32 norms and more than one quant type
    recipe.write_text(recipe.read_text().replace("imatrix: auto", "imatrix: false").replace(
        ", {name: Q4_K_R, target: {bpw: 5.5}}", ""))
    code, output = _run("check", recipe)
    assert code != 0 and "imatrix: says how the release computes its importance matrix" in output, output
