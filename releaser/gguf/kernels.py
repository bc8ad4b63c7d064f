"""Quantize one float32 matrix to a ggml type, in row chunks over a thread pool (numpy releases the GIL).

The kernels are ``releaser.gguf.quants.quantize`` (llama.cpp's exact bytes). The K-quant kernels are numba-parallel
over blocks already and numba's default threading layer must not be entered from two threads at once, so they run one
call at a time (in larger row chunks, which bounds their temporary memory).
"""

from __future__ import annotations

from concurrent.futures import Executor
from threading import Lock

import numpy as np
from gguf import GGMLQuantizationType as T

from .quants import quantize as _quantize

CHUNK_ELEMENTS = 1 << 21  # rows per task ~ 2M weights: enough tasks to keep every core busy
K_CHUNK_ELEMENTS = 1 << 23  # K-quant calls: 8M weights (32k blocks for numba's parallel loop)
K_TYPES = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
_K_LOCK = Lock()


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
    step = max(1, (K_CHUNK_ELEMENTS if qtype in K_TYPES else CHUNK_ELEMENTS) // rows.shape[1])
    return [pool.submit(_one, rows[i:i + step], qtype) for i in range(0, rows.shape[0], step)]


def collect(futures: list) -> np.ndarray:
    """Join the chunks of :func:`submit` into one contiguous byte array."""
    parts = [f.result() for f in futures]
    return np.concatenate([p.reshape(-1).view(np.uint8) for p in parts])
