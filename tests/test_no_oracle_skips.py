"""An oracle test can never skip in CI: every test module gets its oracles (llama-cpp-python, AutoAWQ, the
gguf_oracle helpers) through ``conftest.require``, which skips only outside CI (CI=true makes a missing oracle a
failure). A bare ``importorskip`` or ``pytest.skip`` would turn a broken install into a quiet skip."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent
# skips that are not about an oracle: why each may skip (the test itself states it)
ALLOWED = {("test_awq_errors.py", 'pytest.skip("a GPU is present")'),
           ("test_faults.py", "pytest.skip(message)"),   # no tmpfs mount outside CI; pytest.fail in CI
           ("gguf_oracle.py", "pytest.skip(message)"),    # llama.cpp's converter script not unpacked; pytest.fail in CI
           ("test_runtimes.py", "pytest.skip(message)")}  # llama-server's options (the sdist) missing; pytest.fail in CI


def test_no_test_skips_on_its_own():
    found = set()
    for path in sorted(TESTS.glob("*.py")):
        if path.name in ("conftest.py", Path(__file__).name):
            continue
        for m in re.finditer(r"pytest\.(importorskip|skip)\([^)]*\)|skipif\(", path.read_text()):
            found.add((path.name, m.group(0)))
    assert found <= ALLOWED, sorted(found - ALLOWED)


def test_a_missing_oracle_fails_in_ci_and_skips_elsewhere(tmp_path):
    (tmp_path / "test_probe.py").write_text("from conftest import require\n\n\ndef test_probe():\n"
                                            "    require('no_such_oracle_module')\n")
    (tmp_path / "conftest.py").write_text((TESTS / "conftest.py").read_text())

    def outcome(ci: str) -> str:
        env = {"CI": ci, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                              capture_output=True, text=True, env=env, cwd=tmp_path)
        return proc.stdout.strip().splitlines()[-1]

    assert "1 failed" in outcome("true")
    assert "1 skipped" in outcome("")
