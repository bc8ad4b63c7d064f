"""Reusable scratch memory for the merge engine.

Every merged tensor needs a few tensor-sized temporaries (the inputs cast to the config dtype, float32 working copies,
the output in its dtype). Allocated fresh, each is new memory that the kernel must fault in and zero page by page
(most of a merge's system time); from a :class:`Pool` the same memory serves tensor after tensor. A job's temporaries
go back to the pool when the job is done (:func:`job`), so the pool never holds more than the largest set of
temporaries that were in use at once (and at most ``limit`` bytes of idle buffers).

Outside :func:`job` (or for small or non-CPU tensors), :func:`empty` and :func:`cast` are plain ``torch.empty`` and
``Tensor.to``.
"""

from __future__ import annotations

import mmap
import threading
from contextlib import contextmanager

import torch

MIN_BYTES = 1 << 20   # smaller temporaries come from malloc's free lists anyway

_local = threading.local()


class Pool:
    """Byte buffers handed out best-fit and taken back (thread-safe)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.idle: list[torch.Tensor] = []
        self.idle_bytes = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """An idle buffer of ``nbytes`` to twice that (the smallest), else a new one. Idle buffers more than twice
        as large are freed then: jobs run largest first, so they would mostly sit idle while smaller ones are made."""
        with self._lock:
            fits = [i for i, b in enumerate(self.idle) if nbytes <= b.numel() <= 2 * nbytes]
            if fits:
                buf = self.idle.pop(min(fits, key=lambda i: self.idle[i].numel()))
                self.idle_bytes -= buf.numel()
                return buf
            self.idle = [b for b in self.idle if b.numel() < nbytes]
            self.idle_bytes = sum(b.numel() for b in self.idle)
        return _new_buffer(nbytes)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            if self.idle_bytes + buf.numel() <= self.limit:
                self.idle.append(buf)
                self.idle_bytes += buf.numel()

    def clear(self) -> None:
        with self._lock:
            self.idle.clear()
            self.idle_bytes = 0


def _new_buffer(nbytes: int) -> torch.Tensor:
    """Anonymous memory of its own, in huge pages where the system allows them (one fault per 2 MB, not per 4 KB);
    unmapped when the last tensor on it is freed."""
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return torch.frombuffer(m, dtype=torch.uint8)


@contextmanager
def job(pool: Pool | None):
    """Temporaries made by :func:`empty` in this thread inside the block come from ``pool`` and go back to it at the
    end: nothing made inside may be used after the block."""
    if pool is None:
        yield
        return
    taken: list[torch.Tensor] = []
    _local.arena = (pool, taken)
    try:
        yield
    finally:
        _local.arena = None
        for buf in taken:
            pool.give(buf)


def empty(shape, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``, from the current job's pool where there is one."""
    arena = getattr(_local, "arena", None)
    shape = tuple(shape)
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if arena is None or torch.device(device).type != "cpu" or nbytes < MIN_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    pool, taken = arena
    buf = pool.take(nbytes)
    taken.append(buf)
    return buf[:nbytes].view(dtype).view(shape)


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` (the same values, ``t`` itself when it has that dtype), made by :func:`empty`."""
    if t.dtype == dtype:
        return t
    out = empty(t.shape, dtype, t.device)
    out.copy_(t)
    return out
