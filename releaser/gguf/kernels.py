"""Quantize one float32 matrix to a ggml type, in row chunks over a thread pool (numpy releases the GIL).

The kernels are ``releaser.gguf.quants.quantize`` (llama.cpp's exact bytes). The K-quant kernels are numba-parallel
over blocks already (and release the GIL); numba's default threading layer must not be entered from two threads at
once, so ``quants`` runs their searches one at a time, while the other steps of a chunk (checks, bit packing) overlap
them. K-quant chunks are larger (more blocks per parallel call).
"""

from __future__ import annotations

import os
from concurrent.futures import Executor

import numpy as np
from gguf import GGMLQuantizationType as T

from .quants import quantize as _quantize

CHUNK_ELEMENTS = 1 << 21  # rows per task ~ 2M weights: enough tasks to keep every core busy
K_CHUNK_ELEMENTS = 1 << 23  # K-quant calls: 8M weights (32k blocks for numba's parallel loop)
K_TYPES = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)


def _one(data: np.ndarray, qtype: T) -> np.ndarray:
    if qtype == T.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == T.F16:
        return data.astype(np.float16)
    return np.asarray(_quantize(data, qtype))


def submit(pool: Executor, data: np.ndarray, qtype: T) -> list:
    """Start quantizing ``data`` (float32, [..., n_per_row]) to ``qtype``; returns futures of the row chunks."""
    rows = data.reshape(-1, data.shape[-1]) if data.ndim > 1 else data.reshape(1, -1)
    step = max(1, (K_CHUNK_ELEMENTS if qtype in K_TYPES else CHUNK_ELEMENTS) // rows.shape[1])
    return [pool.submit(_one, rows[i:i + step], qtype) for i in range(0, rows.shape[0], step)]


def collect(futures: list) -> np.ndarray:
    """Join the chunks of :func:`submit` into one contiguous byte array."""
    parts = [f.result().reshape(-1).view(np.uint8) for f in futures]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _dispatchers(qtypes) -> list:
    from . import kquants

    by_type = {T.Q2_K: kquants.q2_k_blocks, T.Q3_K: kquants.q3_k_blocks, T.Q4_K: kquants.qkx_blocks,
               T.Q5_K: kquants.qkx_blocks, T.Q6_K: kquants.q6_k_blocks}
    return list({id(f): f for t in qtypes if (f := by_type.get(t)) is not None}.values())


def needs_compile(qtypes) -> bool:
    """True when a K-quant kernel of ``qtypes`` has no compiled version in numba's on-disk cache (the first run on a
    machine compiles them, ~10 s); False when all are cached or the cache cannot be inspected."""
    try:
        return any(not os.path.exists(f._cache._cache_file._index_path) for f in _dispatchers(qtypes))
    except Exception:  # noqa: BLE001 - numba internals; the answer only chooses a progress message
        return False


def warm_up(qtypes) -> None:
    """Compile (or load from the cache) the K-quant kernels of ``qtypes`` on one block, before the real work."""
    for qtype in dict.fromkeys(qtypes):
        if qtype in K_TYPES:
            _one(np.zeros((1, 256), np.float32), qtype)
