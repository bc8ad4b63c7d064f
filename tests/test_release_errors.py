"""Bad input to ``releaser release`` / ``releaser check``: one line naming the problem, a non-zero exit code, and
nothing written. A tiny model keeps these fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safety_helpers import model  # noqa: F401 (fixture)
from safety_helpers import one_line_error as _one_line_error
from safety_helpers import run as _run

BASE = """\
name: me/Tiny
description: A tiny release.
stop_audit: false
"""


@pytest.mark.parametrize("body, problem", [
    ("model: {m}\nlicence: mit\n", "licence: unknown key 'licence'; did you mean 'license'?"),
    ("model: {m}\ngguf: {{quantz: [Q4_K_M]}}\n", "gguf.quantz: unknown key 'quantz'; did you mean 'quants'?"),
    ("model: {m}\ngguf: {{quants: [Q4_K_X]}}\n", "unknown GGUF quant type Q4_K_X"),
    ("model: {m}\ntokenizer: {{template: chatml, eoss: x}}\n", "tokenizer.eoss: unknown key 'eoss'; did you mean 'eos'?"),
    ("model: {m}\npublish: {{target: s3:bucket}}\n", "publish.target: target must be 'hub' or 'dir:PATH'"),
    ("", "needs exactly one of merge: (a mergekit config to run) and model:"),
    ("model: {m}\nmerge: {{merge_method: linear, models: [{{model: {m}, parameters: {{weight: 1}}}}]}}\n",
     "needs exactly one of merge:"),
    ("merge: {{merge_methd: linear}}\n", "merge: unknown key 'merge_methd' in the merge config; did you mean "
                                         "'merge_method'?"),
    ("model: {m}\ntokenizer: {{template: nosuch}}\n", "nosuch"),
    ("model: {m}\nawq: {{bits: 3}}\n", "awq.bits: bits 3 is not supported: the AWQ GEMM format holds 4-bit weights only"),
    ("model: {m}\nawq: {{calibration: missing.txt}}\n", "awq.calibration:"),
    ("model: {m}\nawq: {{group_sise: 64}}\n", "awq.group_sise: unknown key 'group_sise'; did you mean 'group_size'?"),
    ("model: {m}\ngguf: {{quants: [Q8_0]}}\nquality: {{chunk: 4}}\n", "quality.chunk: unknown key 'chunk'; did you "
                                                                       "mean 'chunks'?"),
    ("model: {m}\ngguf: {{quants: [Q8_0]}}\nquality: {{text: nosuch.txt}}\n", "quality.text:"),
])
def test_bad_recipes_are_one_line_errors_and_write_nothing(model, tmp_path, body, problem):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE + body.format(m=model))
    for command in (["check", recipe], ["release", recipe, "-o", tmp_path / "work"]):
        code, output = _run(*command)
        assert code != 0
        assert problem in _one_line_error(output), output
    assert not (tmp_path / "work").exists()


def test_only_names_an_unknown_stage(model, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE + f"model: {model}\n")
    code, output = _run("release", recipe, "-o", tmp_path / "work", "--only", "gguf,quantise")
    assert code != 0
    assert "--only: unknown stage 'quantise'; the stages are merge, tokenizer, verify, imatrix, gguf, runtimes, awq, w4a16, mlx, quality, cards, publish" in \
        _one_line_error(output)
    assert not (tmp_path / "work").exists()


def _release(model: Path, tmp_path: Path, name: str = "me/Tiny") -> Path:
    recipe = tmp_path / f"{name.split('/')[1]}.yaml"
    recipe.write_text(f"name: {name}\ndescription: A tiny release.\nstop_audit: false\nmodel: {model}\ntokenizer: {{template: chatml}}\n")
    code, output = _run("release", recipe, "-o", tmp_path / "work")
    assert code == 0, output
    return recipe


def test_a_tiny_release_without_gguf(model, tmp_path):
    _release(model, tmp_path)
    work = tmp_path / "work"
    assert sorted(p.name for p in work.iterdir()) == ["Tiny", "published", "release.json"]
    assert (work / "published" / "me" / "Tiny" / "README.md").is_file()
    stages = json.loads((work / "release.json").read_text())["stages"]
    assert sorted(stages) == ["cards", "publish", "tokenizer", "verify"]   # no gguf: section, no gguf stage
    assert "<|im_end|>" in stages["verify"]["summary"]


def test_a_left_out_quant_stage_leaves_its_repo_out(model, tmp_path):
    """--skip gguf on a recipe with gguf: and no earlier GGUF: the cards and the publish step cover the main repo only
    (no error about a missing folder), and quality has nothing to measure."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE + f"model: {model}\ntokenizer: {{template: chatml}}\ngguf: {{quants: [Q8_0]}}\n")
    code, output = _run("release", recipe, "-o", tmp_path / "work", "--skip", "gguf")
    assert code == 0, output
    work = tmp_path / "work"
    assert sorted(p.name for p in work.iterdir()) == ["Tiny", "published", "release.json"]
    stages = json.loads((work / "release.json").read_text())["stages"]
    assert sorted(stages) == ["cards", "publish", "tokenizer", "verify"]


def test_work_folder_of_another_release(model, tmp_path):
    _release(model, tmp_path)
    before = sorted(p.name for p in (tmp_path / "work").rglob("*"))
    other = tmp_path / "other.yaml"
    other.write_text(f"name: me/Other\ndescription: x\nstop_audit: false\nmodel: {model}\n")
    code, output = _run("release", other, "-o", tmp_path / "work")
    assert code != 0
    assert "holds the release of 'me/Tiny', not 'me/Other'; choose another work folder with -o" in \
        _one_line_error(output)
    assert sorted(p.name for p in (tmp_path / "work").rglob("*")) == before


@pytest.mark.parametrize("damage", ["edit", "truncate"])
def test_a_damaged_manifest_is_not_trusted(model, tmp_path, damage):
    recipe = _release(model, tmp_path)
    manifest = tmp_path / "work" / "release.json"
    text = manifest.read_text()
    if damage == "edit":
        data = json.loads(text)
        data["stages"]["tokenizer"]["files"][0]["sha256"] = "0" * 64
        manifest.write_text(json.dumps(data))
    else:
        manifest.write_text(text[: len(text) // 2])
    damaged = manifest.read_bytes()
    code, output = _run("release", recipe, "-o", tmp_path / "work")
    assert code != 0
    assert "is damaged or was edited by hand" in _one_line_error(output)
    assert manifest.read_bytes() == damaged
    code, output = _run("release", recipe, "-o", tmp_path / "work", "--force")   # the documented way out
    assert code == 0, output
    assert json.loads(manifest.read_text())["release"] == "me/Tiny"
