"""Two releases on one work folder: the second fails at once, naming the first by its pid, and changes nothing; a
release killed with kill -9 does not block the next one; a finished release leaves no lock file behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from release_helpers import tree
from safety_helpers import model, one_line_error, recipe, release, run  # noqa: F401 (fixture)

HOLD = """
import sys, time
from releaser.pipeline.lock import WorkLock
lock = WorkLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _holder(work) -> subprocess.Popen:
    """Another process holding the work folder as a running release does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(work)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_release_fails_at_once_naming_the_first(model, tmp_path):
    path = release(tmp_path, model)
    work = tmp_path / "work"
    before = tree(work)
    first = _holder(work)
    try:
        start = time.monotonic()
        code, output = run("release", path, "-o", work, "--force")
        assert time.monotonic() - start < 30
        assert code != 0
        line = one_line_error(output)
        assert f"another release is running on {work} (pid {first.pid})" in line, line
        assert tree(work) == {**before, ".releaser-release.lock": tree(work)[".releaser-release.lock"]}
    finally:
        first.kill()
        first.wait()


def test_a_killed_release_does_not_block_the_next(model, tmp_path):
    path = recipe(tmp_path, model)
    work = tmp_path / "work"
    first = _holder(work)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert (work / ".releaser-release.lock").exists()   # what kill -9 leaves
    code, output = run("release", path, "-o", work)
    assert code == 0, output
    assert not (work / ".releaser-release.lock").exists()


def test_a_finished_release_leaves_no_lock(model, tmp_path):
    release(tmp_path, model)
    assert not any(p.name.startswith(".") for p in (tmp_path / "work").rglob("*"))
