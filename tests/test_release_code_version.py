"""Bytes depend only on the recipe and the code (issue 18, item 11): each stage's fingerprint holds the versions of the
code that makes its bytes (a digest of releaser's subpackage, the libraries' versions), so an upgrade that changes
how a quant is made re-runs that stage instead of reporting it up to date, and leaves the others alone."""

from __future__ import annotations

import json
import shutil

import pytest
from safety_helpers import release, run

from releaser.pipeline import manifest
from releaser_testing import tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory, smollm2):
    """A tiny Llama with SmolLM2's BPE tokenizer (the GGUF export needs a BPE vocabulary)."""
    path = tiny_model(tmp_path_factory.mktemp("bpe") / "model", "llama", layers=2, hidden=64, intermediate=128,
                      vocab=49152)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2 / name, path / name)
    return path


def test_an_upgrade_of_the_gguf_code_reruns_the_stages_made_with_it(model, tmp_path, monkeypatch):
    path = release(tmp_path, model, extra="gguf: {quants: [Q8_0]}\nquality: false\n")
    work = tmp_path / "work"
    before = json.loads((work / "release.json").read_text())["stages"]
    assert before["gguf"]["depends"]["code"]["releaser.gguf"] == manifest.code_versions(("releaser.gguf",))[
        "releaser.gguf"]

    code, output = run("release", path, "-o", work)   # nothing changed: nothing runs
    assert code == 0 and ": running" not in output, output

    real = manifest.code_versions

    def upgraded(code):
        return {k: ("0" * 16 if k == "releaser.gguf" else v) for k, v in real(code).items()}

    monkeypatch.setattr(manifest, "code_versions", upgraded)
    monkeypatch.setattr("releaser.pipeline.run.code_versions", upgraded)
    monkeypatch.setattr("releaser.pipeline.stages.code_versions", upgraded)
    code, output = run("release", path, "-o", work)
    assert code == 0, output
    assert "gguf: running (the code that makes its bytes changed (releaser.gguf))" in output, output
    # the stages whose code lists releaser.gguf: verify (its stop audit reads llama.cpp's end-of-generation rule
    # there) and runtimes (the same rule, for Ollama's stops) run again; merge, tokenizer and awq do not
    assert [line.split(":")[0] for line in output.splitlines() if ": running (" in line] == \
        ["verify", "gguf", "runtimes", "cards"], output
    after = json.loads((work / "release.json").read_text())["stages"]
    assert after["gguf"]["facts"].get("metadata_only") is not True   # requantized, not a metadata rewrite
    assert after["gguf"]["depends"]["code"]["releaser.gguf"] == "0" * 16


def test_the_source_digest_follows_the_files():
    digest = manifest.code_versions(("releaser.gguf", "releaser.templates", "numpy"))
    assert len(digest["releaser.gguf"]) == 16 and digest["releaser.gguf"] != digest["releaser.templates"]
    import numpy
    assert digest["numpy"] == numpy.__version__
