"""``releaser release`` end to end on the demo recipe (the real SmolLM2 model), run as real processes: the folders,
the manifest, the no-op rerun, a tokenizer re-release, kill -9 and resume, and the gate."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import yaml

from release_helpers import NAME, ROOT, cli, demo_layout, hashes, link_copy, timed_release, tree

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """One demo release for the whole session: (recipe path, work folder, wall seconds of the first run)."""
    root = tmp_path_factory.mktemp("demo-release")
    recipe = demo_layout(root)
    proc, seconds = timed_release(recipe, root / "work")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return recipe, root / "work", seconds


def _manifest(work: Path) -> dict:
    return json.loads((work / "release.json").read_text())


def test_release_folders_mirror_the_repos(demo):
    _, work, _ = demo
    main, quants, awq = work / NAME, work / f"{NAME}-GGUF", work / f"{NAME}-AWQ"
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "generation_config.json"} <= \
        {p.name for p in main.iterdir()}
    assert sorted(p.name for p in quants.iterdir()) == ["README.md", f"{NAME}-Q4_K_M.gguf", f"{NAME}-Q8_0.gguf",
                                                         "model.yaml", "params"]   # the runtime files (issue 23)
    assert json.loads((quants / "params").read_text())["stop"] == ["<|im_end|>"]
    assert {"model.safetensors", "config.json", "awq_calibration.json", "tokenizer.json", "chat_template.jinja",
            "README.md"} <= {p.name for p in awq.iterdir()}
    assert json.loads((awq / "config.json").read_text())["quantization_config"]["version"] == "gemm"
    ct, mlx = work / f"{NAME}-W4A16", work / f"{NAME}-MLX-4bit"   # the same AWQ codes in two more formats
    assert json.loads((ct / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    q = json.loads((mlx / "config.json").read_text())["quantization"]
    assert q["bits"] == 4 and q["group_size"] == 64 and q["model.embed_tokens"]["bits"] == 8
    assert (mlx / "awq_calibration.json").read_bytes() == (awq / "awq_calibration.json").read_bytes()
    for name in ("tokenizer_config.json", "chat_template.jinja", "generation_config.json"):   # the fixed tokenizer
        for folder in (awq, ct, mlx):
            assert (folder / name).read_bytes() == (main / name).read_bytes(), (folder.name, name)
    for folder in (quants, awq, ct, mlx):
        card = (folder / "README.md").read_text()
        assert "base_model_relation: quantized" in card and "quantized_by: demo" in card and "apache-2.0" in card
    # the published mirror (dir: target) equals the repo folders byte for byte
    for repo in (NAME, f"{NAME}-GGUF", f"{NAME}-AWQ", f"{NAME}-W4A16", f"{NAME}-MLX-4bit"):
        assert hashes(work / "published" / "demo" / repo) == hashes(work / repo)
    # nothing temporary is left anywhere
    assert not [p for p in work.rglob("*") if ".releaser-" in p.name]


def test_manifest_records_inputs_versions_stages_and_artefacts(demo):
    _, work, _ = demo
    m = _manifest(work)
    assert m["release"] == f"demo/{NAME}" and m["versions"]["releaser"] and m["versions"]["torch"]
    assert sorted(m["stages"]) == ["awq", "cards", "gguf", "merge", "mlx", "publish", "quality", "runtimes",
                                   "tokenizer", "verify", "w4a16"]
    audit = m["stages"]["verify"]["facts"]["stop_audit"]   # the demo's model ends most answers, with <|im_end|>
    assert audit["answers"] == 16 and audit["share_ended"] >= 0.5 and audit["endings"] == {"<|im_end|>": 2}, audit
    inputs = m["inputs"]   # the two parents and the LoRA folded into the second
    assert len(inputs) == 3
    weights = [i["files"].get("model.safetensors") or i["files"].get("adapter_model.safetensors")
               for i in inputs.values()]
    assert all(len(w) == 64 for w in weights), inputs
    gguf_files = {f["path"]: f for f in m["stages"]["gguf"]["files"]}
    path = work / f"{NAME}-GGUF" / f"{NAME}-Q4_K_M.gguf"
    assert gguf_files[path.name]["size"] == path.stat().st_size
    import hashlib

    assert gguf_files[path.name]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_quality_is_measured_recorded_and_in_the_cards(demo):
    """Every quant of the release is measured against the main folder; the figures are in the manifest, in
    quality.json and in the GGUF, AWQ and MLX cards;"""
    _, work, _ = demo
    m = _manifest(work)
    report = json.loads((work / "quality.json").read_text())
    assert {k: v for k, v in m["stages"]["quality"]["facts"].items() if k != "seconds"} == report
    assert m["stages"]["quality"]["facts"]["seconds"]["total"] > 0   # run times: in the manifest, not the report
    rows = {r["quant"]: r for r in report["artefacts"]}
    assert sorted(rows) == ["AWQ", "MLX-4bit", "Q4_K_M", "Q8_0", "W4A16"]
    assert report["model"]["path"] == NAME   # relative to the work folder: the bytes do not depend on where it is
    assert 0 < rows["Q8_0"]["kld_mean"] < rows["Q4_K_M"]["kld_mean"] < 0.2
    assert 0 < rows["AWQ"]["kld_mean"] < 0.3 and report["gate"]["passed"] and report["stop_test"]["passed"]
    gguf_card = (work / f"{NAME}-GGUF" / "README.md").read_text()
    q4 = rows["Q4_K_M"]
    assert f"{q4['ppl']:.3f}" in gguf_card and f"{q4['kld_mean']:.4f}" in gguf_card
    awq_card = (work / f"{NAME}-AWQ" / "README.md").read_text()
    assert f"{rows['AWQ']['ppl']:.3f}" in awq_card and "King James" in awq_card
    # W4A16 is the AWQ weights; MLX the AWQ codes with an 8-bit embedding/head: about AWQ's figures, well in its gate
    assert rows["W4A16"]["kld_mean"] == rows["AWQ"]["kld_mean"]
    assert 0 < rows["MLX-4bit"]["kld_mean"] < 1.5 * rows["AWQ"]["kld_mean"] < rows["MLX-4bit"]["max_kld"]
    mlx_card = (work / f"{NAME}-MLX-4bit" / "README.md").read_text()
    assert f"{rows['MLX-4bit']['ppl']:.3f}" in mlx_card and "the codes of an AWQ pass" in mlx_card


def test_second_run_is_a_fast_no_op(demo, tmp_path):
    recipe, work, first = demo
    copy = link_copy(work, tmp_path / "work")
    before = tree(copy)
    proc, seconds = timed_release(recipe, copy)
    assert proc.returncode == 0, proc.stderr
    assert "0 stage(s) ran" in proc.stdout
    assert tree(copy) == before          # not one file rewritten (same bytes and mtimes)
    assert seconds <= 0.10 * first, (seconds, first)


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    reader = gguf.GGUFReader(path)
    return {t.name: np.asarray(t.data).tobytes() for t in reader.tensors}


def test_re_release_of_a_tokenizer_fix_touches_no_weights(demo, tmp_path):
    recipe, work, _ = demo
    copy = link_copy(work, tmp_path / "work")
    data = yaml.safe_load(recipe.read_text())
    data["tokenizer"]["system_prompt"] = "You are a careful assistant."
    data["releases"].insert(0, {"version": "1.1", "date": "2026-11-30", "changes": ["Default system prompt."]})
    fixed = recipe.with_name("demo-fix.yaml")
    fixed.write_text(yaml.safe_dump(data, sort_keys=False))
    before = hashes(copy)
    q4 = copy / f"{NAME}-GGUF" / f"{NAME}-Q4_K_M.gguf"
    tensors_before = _tensor_bytes(q4)
    proc = cli("release", fixed, "-o", copy)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    after = hashes(copy)
    changed = {k for k in before if before[k] != after.get(k)}
    repos = {k for k in changed if not k.startswith("published/")}
    assert repos == {f"{NAME}/chat_template.jinja", f"{NAME}/README.md", f"{NAME}-GGUF/README.md",
                     f"{NAME}-GGUF/{NAME}-Q4_K_M.gguf", f"{NAME}-GGUF/{NAME}-Q8_0.gguf", f"{NAME}-GGUF/model.yaml",
                     f"{NAME}-AWQ/chat_template.jinja", f"{NAME}-AWQ/README.md", f"{NAME}-W4A16/chat_template.jinja",
                     f"{NAME}-W4A16/README.md", f"{NAME}-MLX-4bit/chat_template.jinja", f"{NAME}-MLX-4bit/README.md",
                     "quality.json"}, repos
    assert (copy / f"{NAME}-GGUF" / "system").read_text() == "You are a careful assistant.\n"   # Ollama's, new
    # the default system prompt makes the chat template text one Ollama no longer recognises: its Go form, new
    assert (copy / f"{NAME}-GGUF" / "template").read_text().startswith("{{- range .Messages }}<|im_start|>")
    m = _manifest(copy)
    assert m["stages"]["gguf"]["facts"]["metadata_only"] is True
    assert m["stages"]["awq"]["facts"]["metadata_only"] is True   # AWQ tensors linked, not requantized
    assert _tensor_bytes(q4) == tensors_before                    # not requantized
    template = gguf.GGUFReader(q4).get_field("tokenizer.chat_template").contents()
    assert "You are a careful assistant." in template
    assert "1.1" in (copy / NAME / "README.md").read_text() and "Default system prompt." in \
        (copy / NAME / "README.md").read_text()
    assert m["stages"]["tokenizer"]["changed"]["changed"]          # the manifest shows what changed
    # and the published mirror followed, only for the changed files
    assert hashes(copy / "published" / "demo" / NAME) == hashes(copy / NAME)


def _kill_at(recipe: Path, work: Path, marker: str, *extra: str, writing: bool = False) -> None:
    """Start a release and kill -9 it as soon as its output shows a line containing ``marker`` (a progress line of
    the stage to interrupt), or with ``writing`` once after that the stage has written data into a temporary output
    (its progress on disk): never after a timer."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="200")
    proc = subprocess.Popen([sys.executable, "-m", "releaser.cli", "release", str(recipe), "-o", str(work), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    seen = ""
    try:
        for line in proc.stdout:   # ends when the process does: bounded by the release itself
            seen += line
            if marker in line:
                break
        assert marker in seen, seen
        deadline = time.monotonic() + 600
        while writing and proc.poll() is None and time.monotonic() < deadline and not any(
                _size(p) > 0 for p in work.rglob("*") if ".releaser-tmp-" in str(p)):
            time.sleep(0.005)
        assert proc.poll() is None, "the release finished before it could be killed"
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size if path.is_file() else 0
    except FileNotFoundError:   # renamed or removed meanwhile
        return 0


@pytest.mark.parametrize("stage", ["merge", "gguf"])
def test_killed_release_resumes_to_the_same_bytes(demo, tmp_path, stage):
    recipe, work, _ = demo
    skip = ("--skip", "awq,quality,cards,publish")
    _kill_at(recipe, tmp_path / "work", f"{stage}: running", *skip, writing=True)
    proc = cli("release", recipe, "-o", tmp_path / "work", *skip)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    done = _manifest(tmp_path / "work")["stages"]
    reference = _manifest(work)["stages"]
    for name in ("merge", "tokenizer", "gguf"):
        assert done[name]["files"] == reference[name]["files"], name
    assert not [p for p in (tmp_path / "work").rglob("*") if ".releaser-" in p.name]


def test_release_killed_in_awq_and_in_quality_resumes_to_the_same_bytes(demo, tmp_path):
    """Issue 25: kill -9 inside the AWQ stage (its blocks being quantized) and inside the quality stage (one artefact
    measured, the next in progress), then run to the end: every file of the work folder, cards and published mirror
    included, equals the uninterrupted release's; nothing temporary is left."""
    recipe, reference, _ = demo
    work = tmp_path / "work"
    _kill_at(recipe, work, "rows x")                     # "AWQ 4-bit g64 on cpu: 32 rows x 256 tokens ..."
    _kill_at(recipe, work, f"{NAME}-Q8_0.gguf: PPL")     # the first quant measured; the others are not
    proc = cli("release", recipe, "-o", work)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert hashes(work) == hashes(reference)
    assert not [p for p in work.rglob("*") if ".releaser-" in p.name]


def test_a_rebuilt_gguf_equals_the_first_one(demo, tmp_path):
    """Issue 18 item 10: a GGUF rebuilt after the cards stage wrote the main folder's README.md has the same bytes
    (its metadata comes from the recipe and the model's own files, not from the card)."""
    recipe, work, _ = demo
    copy = link_copy(work, tmp_path / "work")
    q8 = copy / f"{NAME}-GGUF" / f"{NAME}-Q8_0.gguf"
    def ggufs() -> dict[str, str]:
        return {k: v for k, v in hashes(copy / f"{NAME}-GGUF").items() if k.endswith(".gguf")}

    before = ggufs()
    q8.unlink()
    proc = cli("release", recipe, "-o", copy, "--only", "gguf")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert ggufs() == before and len(before) == 2


def test_gate_stops_a_release_with_a_broken_gguf_eos(demo, tmp_path):
    from releaser.gguf.fix import fix_gguf

    recipe, work, _ = demo
    copy = link_copy(work, tmp_path / "work")
    published = hashes(copy / "published")
    q8 = copy / f"{NAME}-GGUF" / f"{NAME}-Q8_0.gguf"
    fix_gguf(q8, eos="<|endoftext|>")
    proc = cli("release", recipe, "-o", copy, "--only", "publish", "--force")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    message = errors[0]
    assert "nothing was published" in message and f"{NAME}-Q8_0.gguf: tokenizer.ggml.eos_token_id" in message
    assert "<|endoftext|>" in message and "changed (sha256" in message
    assert hashes(copy / "published") == published


def test_check_validates_every_recipe_in_the_repository(tmp_path):
    demo_layout(tmp_path)   # the model folders the demo and the example name (check refuses a missing folder)
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes", dirs_exist_ok=True)
    recipes = sorted((tmp_path / "recipes").rglob("*.yaml")) + [tmp_path / "recipes" / "example.yml"]
    assert len(recipes) >= 7
    for recipe in recipes:
        proc = cli("check", recipe)
        assert proc.returncode == 0, (recipe, proc.stderr)
        assert "valid recipe" in proc.stdout
