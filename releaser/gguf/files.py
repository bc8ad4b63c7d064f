"""Atomic output for GGUF files: everything is written in a hidden folder inside the output folder and renamed into
place only when every file is complete, so nothing partial ever sits under a final name."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError


@contextmanager
def staging(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside the final files; removed on exit (after :func:`publish` it is empty)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".releaser-tmp-", dir=out_dir))
    except OSError as exc:
        raise OutputError(f"output folder {out_dir} is not writable ({exc.strerror or exc}); "
                          "choose another folder or fix its permissions") from exc
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_targets(paths: list[Path], overwrite: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise OutputError(f"{existing[0]} already exists; pass --overwrite to replace it or choose another folder")


def publish(staged: list[Path], out_dir: Path) -> list[Path]:
    """Rename complete staged files into ``out_dir`` (same file system: each rename is atomic)."""
    final = []
    for path in staged:
        target = out_dir / path.name
        os.replace(path, target)
        final.append(target)
    return final
