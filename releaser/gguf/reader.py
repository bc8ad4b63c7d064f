"""Open an existing GGUF file for reading, with one-line errors for a missing, truncated or foreign file."""

from __future__ import annotations

import os
from pathlib import Path

import gguf

from ..errors import ModelError

MAGIC = b"GGUF"


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """A :class:`gguf.GGUFReader` of ``path``; a ModelError naming the file when it cannot be one."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"{path} is a folder; pass the path of a .gguf file")
    if not path.is_file():
        raise ModelError(f"{path} does not exist; pass the path of a .gguf file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if magic != MAGIC:
        raise ModelError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    damaged = f"{path} is truncated or damaged (its header describes data the file does not hold); " \
              "re-export or re-download it"
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - gguf-py raises ValueError, struct and numpy errors for a broken file
        raise ModelError(damaged) from exc
    size = path.stat().st_size
    if any(int(t.data_offset) + int(t.n_bytes) > size for t in reader.tensors):
        raise ModelError(damaged)
    return reader
