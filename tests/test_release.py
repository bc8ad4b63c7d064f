"""``releaser release`` end to end on the demo recipe (the real SmolLM2 model), run as real processes: the folders,
the manifest, the no-op rerun, a tokenizer re-release, kill -9 and resume, and the gate."""

from __future__ import annotations

import json
import os
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
    assert sorted(p.name for p in quants.iterdir()) == ["README.md", f"{NAME}-Q4_K_M.gguf", f"{NAME}-Q8_0.gguf"]
    assert {"model.safetensors", "config.json", "awq_calibration.json", "tokenizer.json", "chat_template.jinja",
            "README.md"} <= {p.name for p in awq.iterdir()}
    assert json.loads((awq / "config.json").read_text())["quantization_config"]["version"] == "gemm"
    for name in ("tokenizer_config.json", "chat_template.jinja", "generation_config.json"):   # the fixed tokenizer
        assert (awq / name).read_bytes() == (main / name).read_bytes(), name
    for folder in (quants, awq):
        card = (folder / "README.md").read_text()
        assert "base_model_relation: quantized" in card and "quantized_by: demo" in card and "apache-2.0" in card
    # the published mirror (dir: target) equals the repo folders byte for byte
    for repo in (NAME, f"{NAME}-GGUF", f"{NAME}-AWQ"):
        assert hashes(work / "published" / "demo" / repo) == hashes(work / repo)
    # nothing temporary is left anywhere
    assert not [p for p in work.rglob("*") if ".releaser-" in p.name]


def test_manifest_records_inputs_versions_stages_and_artefacts(demo):
    _, work, _ = demo
    m = _manifest(work)
    assert m["release"] == f"demo/{NAME}" and m["versions"]["releaser"] and m["versions"]["torch"]
    assert sorted(m["stages"]) == ["awq", "cards", "gguf", "merge", "publish", "quality", "tokenizer", "verify"]
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
    quality.json and in the GGUF and AWQ cards."""
    _, work, _ = demo
    m = _manifest(work)
    report = json.loads((work / "quality.json").read_text())
    assert m["stages"]["quality"]["facts"] == report
    rows = {r["quant"]: r for r in report["artefacts"]}
    assert sorted(rows) == ["AWQ", "Q4_K_M", "Q8_0"]
    assert Path(report["model"]["path"]) == work / NAME
    assert 0 < rows["Q8_0"]["kld_mean"] < rows["Q4_K_M"]["kld_mean"] < 0.2
    assert 0 < rows["AWQ"]["kld_mean"] < 0.3 and report["gate"]["passed"] and report["stop_test"]["passed"]
    gguf_card = (work / f"{NAME}-GGUF" / "README.md").read_text()
    q4 = rows["Q4_K_M"]
    assert f"{q4['ppl']:.3f}" in gguf_card and f"{q4['kld_mean']:.4f}" in gguf_card
    awq_card = (work / f"{NAME}-AWQ" / "README.md").read_text()
    assert f"{rows['AWQ']['ppl']:.3f}" in awq_card and "King James" in awq_card


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
                     f"{NAME}-GGUF/{NAME}-Q4_K_M.gguf", f"{NAME}-GGUF/{NAME}-Q8_0.gguf",
                     f"{NAME}-AWQ/chat_template.jinja", f"{NAME}-AWQ/README.md", "quality.json"}, repos
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


def _kill_during(recipe: Path, work: Path, stage: str, delay: float) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "releaser.cli", "release", str(recipe), "-o", str(work),
                             "--skip", "awq,quality,cards,publish"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=ROOT)
    deadline = time.monotonic() + 600
    seen = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
        if f"{stage}: running" in line:
            time.sleep(delay)
            break
    assert f"{stage}: running" in seen, seen
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()


@pytest.mark.parametrize("stage, delay", [("merge", 1.0), ("gguf", 2.0)])
def test_killed_release_resumes_to_the_same_bytes(demo, tmp_path, stage, delay):
    recipe, work, _ = demo
    _kill_during(recipe, tmp_path / "work", stage, delay)
    proc = cli("release", recipe, "-o", tmp_path / "work", "--skip", "awq,quality,cards,publish")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    done = _manifest(tmp_path / "work")["stages"]
    reference = _manifest(work)["stages"]
    for name in ("merge", "tokenizer", "gguf"):
        assert done[name]["files"] == reference[name]["files"], name
    assert not [p for p in (tmp_path / "work").rglob("*") if ".releaser-" in p.name]


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


def test_check_validates_every_recipe_in_the_repository():
    recipes = sorted((ROOT / "recipes").rglob("*.yaml")) + [ROOT / "recipes" / "example.yml"]
    assert len(recipes) >= 7
    for recipe in recipes:
        proc = cli("check", recipe)
        assert proc.returncode == 0, (recipe, proc.stderr)
        assert "valid recipe" in proc.stdout
