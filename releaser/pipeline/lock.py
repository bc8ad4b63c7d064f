"""One release at a time per work folder: ``WORK/.releaser-release.lock`` (an :class:`~releaser.atomic.OutputLock`
holding the running release's pid), so a second ``releaser release`` on the same folder fails at once naming the first
instead of running stages over its outputs. A run killed with ``kill -9`` frees its lock with its process."""

from __future__ import annotations

from pathlib import Path

from ..atomic import OutputLock

LOCK = ".releaser-release.lock"


class WorkLock(OutputLock):
    busy = ("another release is running on {path} (pid {pid}); wait for it to finish, or stop it, or choose another "
            "work folder with -o")

    def __init__(self, work: Path):
        super().__init__(Path(work), Path(work) / LOCK)
