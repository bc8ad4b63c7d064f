"""Ctrl-C or SIGTERM at any point of writing an output leaves nothing behind (issue 25: a SIGTERM between creating
the lock file and locking it left ``.NAME.releaser-lock`` on a busy machine).

The tests interrupt the atomic-output code (``releaser/atomic.py``) at every point where a signal handler can run,
one run per point: ``Terminated`` (what the CLI's SIGTERM handler raises) is raised there, then the CLI's cleanup
(``release_all``) runs, as ``releaser.cli`` does before it exits. After each run: no lock, staging or temporary entry
is left, the output is either absent or complete, and the lock can be taken again. Deterministic: no timing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from releaser import atomic
from releaser.atomic import OutputLock, output_dir, output_files, release_all, write_file
from releaser.errors import OutputError
from releaser.cli.failures import Terminated


def _interrupted_at(n: int, scenario) -> bool:
    """Run ``scenario`` with ``Terminated`` raised at the n-th point where a signal handler can run in releaser's
    atomic-output code, then clean up as the CLI does. True when the interrupt happened (False: fewer points).

    CPython runs a Python signal handler when a function starts and right after a call returns; a profile function
    that raises on the "call", "return" and "c_return" events raises exactly there (and is then switched off)."""
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        where = frame.f_back if event == "return" else frame   # after a return: in the caller, after its call
        if where is not None and (where.f_code.co_filename == atomic.__file__ or where.f_code in SCENARIOS):
            count += 1
            if count == n:
                raise Terminated()

    fired = False
    sys.setprofile(profile)
    try:
        scenario()
    except Terminated:
        fired = True
        release_all()
    finally:
        sys.setprofile(None)
    return fired


def _lock_only(folder: Path) -> None:
    with OutputLock(folder / "out"):
        pass


def _folder(folder: Path) -> None:
    with output_dir(folder / "out") as tmp:
        (tmp / "a.txt").write_text("complete")


def _file(folder: Path) -> None:
    write_file(folder / "out", "complete")


def _files(folder: Path) -> None:
    with output_files(folder / "out") as tmp:
        (tmp / "a.txt").write_text("complete")


def _complete(folder: Path) -> bool:
    out = folder / "out"
    if not out.exists():
        return True
    if out.is_file():
        return out.read_text() == "complete"
    return sorted(p.name for p in out.iterdir()) == ["a.txt"] and (out / "a.txt").read_text() == "complete"


SCENARIOS = {f.__code__ for f in (_lock_only, _folder, _file, _files)}


@pytest.mark.parametrize("scenario", [_lock_only, _folder, _file, _files], ids=["lock", "folder", "file", "files"])
def test_interrupt_at_every_instruction_leaves_nothing(scenario, tmp_path):
    n, checked = 1, 0
    while n < 20_000:   # bounded: the scenarios have a few hundred points
        folder = tmp_path / f"run{n}"
        folder.mkdir()
        fired = _interrupted_at(n, lambda: scenario(folder))
        left = sorted(p.name for p in folder.iterdir() if p.name != "out")
        assert left == [], f"point {n}: {left} left behind"
        assert _complete(folder), f"point {n}: partial output"
        assert not atomic._live, f"point {n}: a lock is still held"
        with OutputLock(folder / "out"):   # free again
            pass
        if not fired:
            break
        checked += 1
        n += 1
    assert checked > 30, checked


def test_a_stale_lock_file_of_a_killed_run_is_taken_over(tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".out.releaser-lock").write_text("")                 # kill -9 after linking: unlocked, so stale
    (tmp_path / ".out.releaser-lock-0123456789ab").write_text("")    # kill -9 before linking
    with OutputLock(out):
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_held_lock_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "out"
    with OutputLock(out) as first:
        with pytest.raises(OutputError, match=r"another releaser run \(pid \d+\) is writing"):
            OutputLock(out).acquire()
        assert first.held and sorted(p.name for p in tmp_path.iterdir()) == [".out.releaser-lock"]
    assert list(tmp_path.iterdir()) == []
