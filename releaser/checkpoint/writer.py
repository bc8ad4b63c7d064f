"""Sharded, streaming, atomic writer for Hugging Face model folders.

The caller declares every output tensor (name, dtype, shape) up front; the writer plans the shards, reserves their
space (a full disk fails before any work is done) and accepts tensors in any order from any thread, writing each at its
planned offset. Everything goes to a temporary folder beside the output (:class:`releaser.atomic.PendingDir`: unique
name, locked output), which replaces the output only in :meth:`CheckpointWriter.commit`, so a failed or killed run
never leaves a partial model under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import torch

from ..atomic import DataSync, PendingDir, os_error as _os_error
from ..errors import OutputError
from ..options import parse_size  # noqa: F401 - re-exported
from . import safetensors_io as st

DEFAULT_SHARD_BYTES = 5_000_000_000


class CheckpointWriter:
    """Write a model folder: ``write()`` every declared tensor, ``add_file()`` the rest, then ``commit()``.

    Used as a context manager, an exception inside the block discards the temporary folder.
    """

    def __init__(self, out_dir: str | os.PathLike, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], *,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False, metadata: dict | None = None):
        self.out_dir = Path(out_dir).absolute()
        self._state = "open"
        self._lock = threading.Lock()
        self._pending = {name for name, _, _ in tensors}
        if len(self._pending) != len(tensors):
            raise ValueError("duplicate tensor names")
        shards: list[list] = [[]]
        size = 0
        for spec in tensors:
            nbytes = st.TensorInfo(spec[0], spec[1], tuple(spec[2]), "").nbytes
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += nbytes
        self.total_bytes = sum(st.TensorInfo(n, d, tuple(s), "").nbytes for n, d, s in tensors)
        n = len(shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        self._where: dict[str, tuple[int, int]] = {}   # name -> (fd, offset)
        self._fds: list[int] = []
        self._sync = DataSync()
        self._pending_dir = PendingDir(self.out_dir, overwrite=overwrite)
        self.tmp_dir = self._pending_dir.tmp
        try:
            for fname, shard in zip(self.files, shards):
                header, offsets = st.layout([(a, b, tuple(c)) for a, b, c in shard], metadata)
                fd = os.open(self.tmp_dir / fname, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                end = len(header) + sum(st.TensorInfo(a, b, tuple(c), "").nbytes for a, b, c in shard)
                if hasattr(os, "posix_fallocate") and end:
                    os.posix_fallocate(fd, 0, end)
                st.write_at(fd, header, 0)
                for name, offset in offsets.items():
                    self._where[name] = (fd, offset)
            self.weight_map = {name: fname for fname, shard in zip(self.files, shards) for name, _, _ in shard}
            self._specs = {name: (dtype, tuple(shape)) for name, dtype, shape in tensors}
        except OSError as exc:
            self.abort()
            raise _os_error(exc, self.out_dir) from exc
        except BaseException:   # Ctrl-C or SIGTERM before the caller's ``with`` holds the writer
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._state != "open":
            raise RuntimeError(f"write() after {self._state}")
        dtype, shape = self._specs[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, declared {dtype} {shape}")
        with self._lock:
            if name not in self._pending:
                raise RuntimeError(f"{name} written twice")
            self._pending.discard(name)
        fd, offset = self._where[name]
        data = tensor.detach().cpu().contiguous()
        if data.numel():
            try:
                st.write_at(fd, data.reshape(-1).view(torch.uint8).numpy().data, offset)   # flat first: a [N, 1]
                #                                                                       view keeps stride N
                self._sync.written(fd)   # made durable in the background: the commit's fsync waits less
            except OSError as exc:
                raise _os_error(exc, self.out_dir) from exc

    def add_file(self, name: str, content: str | bytes) -> None:
        if self._state != "open":
            raise RuntimeError(f"add_file() after {self._state}")
        data = content.encode() if isinstance(content, str) else content
        try:
            (self.tmp_dir / name).write_bytes(data)
        except OSError as exc:
            raise _os_error(exc, self.out_dir) from exc

    def copy_file(self, src: str | os.PathLike, name: str | None = None) -> None:
        if self._state != "open":
            raise RuntimeError(f"copy_file() after {self._state}")
        try:
            shutil.copyfile(src, self.tmp_dir / (name or Path(src).name))
        except OSError as exc:
            raise _os_error(exc, self.out_dir) from exc

    def commit(self) -> Path:
        """Finish the shards, write the index, and move the folder into place (replacing an old one)."""
        if self._state != "open":
            raise RuntimeError(f"commit() after {self._state}")
        if self._pending:
            raise RuntimeError(f"{len(self._pending)} declared tensors were not written, e.g. {sorted(self._pending)[0]}")
        try:
            if len(self.files) > 1:
                index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
                (self.tmp_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            self._sync.close()
            for fd in self._fds:
                os.close(fd)
            self._fds.clear()
        except OSError as exc:
            self.abort()
            raise _os_error(exc, self.out_dir) from exc
        self._pending_dir.commit()
        self._state = "committed"
        return self.out_dir

    def abort(self) -> None:
        self._sync.close(check=False)
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        if self._state == "open":
            self._pending_dir.abort()
        self._state = "aborted"

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._state == "open" and exc_type is not None:
            self.abort()
