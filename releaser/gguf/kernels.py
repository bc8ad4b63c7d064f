"""Quantize one float32 matrix to a ggml type, in row chunks over a thread pool (numpy releases the GIL).

The kernels are ``releaser.gguf.quants.quantize`` (K-quants, written by the quants module); while that module is absent
(during development) gguf-py's ``gguf.quants.quantize`` provides the legacy types, with the same signature.
The K-quant kernels are numba-parallel over blocks already and numba's default threading layer must not be entered
from two threads at once, so they run one call at a time, on whole tensors.
"""

from __future__ import annotations

from concurrent.futures import Executor
from functools import lru_cache
from threading import Lock

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

try:
    from .quants import quantize as _quantize
except ImportError:  # pragma: no cover - depends on which modules are present
    from gguf.quants import quantize as _quantize

CHUNK_ELEMENTS = 1 << 21  # rows per task ~ 2M weights: enough tasks to keep every core busy
K_TYPES = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
_K_LOCK = Lock()


@lru_cache(maxsize=None)
def supported(qtype: T) -> bool:
    """Whether a kernel for ``qtype`` is available (probed once on one zero block)."""
    if qtype in (T.F32, T.F16):
        return True
    try:
        _one(np.zeros((1, GGML_QUANT_SIZES[qtype][0]), np.float32), qtype)
    except Exception:  # the kernel module raises for types it lacks
        return False
    return True


def _one(data: np.ndarray, qtype: T) -> np.ndarray:
    if qtype == T.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == T.F16:
        return data.astype(np.float16)
    if qtype in K_TYPES:
        with _K_LOCK:
            return np.asarray(_quantize(data, qtype))
    return np.asarray(_quantize(data, qtype))


def submit(pool: Executor, data: np.ndarray, qtype: T) -> list:
    """Start quantizing ``data`` (float32, [..., n_per_row]) to ``qtype``; returns futures of the row chunks."""
    rows = data.reshape(-1, data.shape[-1]) if data.ndim > 1 else data.reshape(1, -1)
    step = rows.shape[0] if qtype in K_TYPES else max(1, CHUNK_ELEMENTS // rows.shape[1])
    return [pool.submit(_one, rows[i:i + step], qtype) for i in range(0, rows.shape[0], step)]


def collect(futures: list) -> np.ndarray:
    """Join the chunks of :func:`submit` into one contiguous byte array."""
    parts = [f.result() for f in futures]
    return np.concatenate([p.reshape(-1).view(np.uint8) for p in parts])
