"""Quantize one float32 matrix to a ggml type, in row chunks over a thread pool (numpy releases the GIL).

The kernels are ``releaser.gguf.quants.quantize`` (llama.cpp's exact bytes). The K-quant and I-quant kernels are
numba-parallel over blocks already (and release the GIL); numba's default threading layer must not be entered from two
threads at once, so ``quants`` runs their searches one at a time, while the other steps of a chunk (checks, bit
packing) overlap them. K-quant chunks are larger (more blocks per parallel call).
"""

from __future__ import annotations

import os
from concurrent.futures import Executor

import numpy as np
from gguf import GGMLQuantizationType as T

from .quants import WEIGHTED_TYPES, WEIGHTS_REQUIRED, quantize as _quantize

CHUNK_ELEMENTS = 1 << 21  # rows per task ~ 2M weights: enough tasks to keep every core busy
K_CHUNK_ELEMENTS = 1 << 23  # K-quant calls: 8M weights (32k blocks for numba's parallel loop)
K_TYPES = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS, T.IQ3_S, T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS,
           T.IQ2_S, T.IQ1_S, T.IQ1_M)   # numba kernels, with or without weights (IQ2_XXS / IQ2_XS / IQ1_S: only with)


def _numba(qtype: T, weights) -> bool:   # numba-parallel kernels: one call at a time, in large chunks
    return qtype in K_TYPES or (weights is not None and qtype in WEIGHTED_TYPES)


def _one(data: np.ndarray, qtype: T, weights: np.ndarray | None = None) -> np.ndarray:
    if qtype == T.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == T.F16:
        return data.astype(np.float16)
    return np.asarray(_quantize(data, qtype, weights))


def submit(pool: Executor, data: np.ndarray, qtype: T, weights: np.ndarray | None = None) -> list:
    """Start quantizing ``data`` (float32, [..., n_per_row]) to ``qtype``; returns futures of the row chunks.
    ``weights``: importance weights, [n_per_row] or one row per matrix (data.shape[:-2] + [n_per_row]); chunks then
    stop at matrix (expert) boundaries, as llama-quantize's do."""
    cols = data.shape[-1]
    per_matrix = data.shape[-2] if data.ndim > 1 else 1
    matrices = data.reshape(-1, per_matrix, cols)
    if weights is not None:
        weights = np.broadcast_to(np.asarray(weights, np.float32), (*data.shape[:-2], cols)).reshape(-1, cols)
    step = max(1, (K_CHUNK_ELEMENTS if _numba(qtype, weights) else CHUNK_ELEMENTS) // cols)
    if weights is None:   # chunks may span matrices
        rows = matrices.reshape(-1, cols)
        return [pool.submit(_one, rows[i:i + step], qtype) for i in range(0, rows.shape[0], step)]
    return [pool.submit(_one, m[i:i + step], qtype, weights[e]) for e, m in enumerate(matrices)
            for i in range(0, per_matrix, step)]


def collect(futures: list) -> np.ndarray:
    """Join the chunks of :func:`submit` into one contiguous byte array."""
    parts = [f.result().reshape(-1).view(np.uint8) for f in futures]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _dispatchers(qtypes, weighted: bool = False) -> list:
    from . import iquants, iquants1, iquants3, kquants

    by_type = {T.Q2_K: kquants.q2_k_blocks, T.Q3_K: kquants.q3_k_blocks, T.Q4_K: kquants.qkx_blocks,
               T.Q5_K: kquants.qkx_blocks, T.Q6_K: kquants.q6_k_blocks, T.IQ4_NL: iquants.iq4_nl_rows,
               T.IQ4_XS: iquants.iq4_xs_rows, T.IQ3_S: iquants3.iq3_rows, T.IQ3_XXS: iquants3.iq3_rows,
               T.IQ1_S: iquants1.iq1_s_rows, T.IQ1_M: iquants1.iq1_m_rows}
    if any(t in (T.IQ2_XXS, T.IQ2_XS, T.IQ2_S) for t in qtypes):   # its grid tables take half a second: on use
        from . import iquants2

        by_type.update(dict.fromkeys((T.IQ2_XXS, T.IQ2_XS, T.IQ2_S), iquants2.iq2_kernel))
    found = [f for t in qtypes if (f := by_type.get(t)) is not None]
    if weighted:
        from . import kquants_imatrix as kw

        w_by_type = {T.Q2_K: kw.q2_k_blocks_w, T.Q3_K: kw.q3_k_blocks_w, T.Q4_K: kw.qkx_blocks_w,
                     T.Q5_K: kw.qkx_blocks_w, T.Q6_K: kw.q6_k_blocks_w, T.Q4_0: kw.qx_rows_w, T.Q5_0: kw.qx_rows_w,
                     T.Q4_1: kw.qkx_rows_w, T.Q5_1: kw.qkx_rows_w}
        found += [f for t in qtypes if (f := w_by_type.get(t)) is not None]
    return list({id(f): f for f in found}.values())


def needs_compile(qtypes, weighted: bool = False) -> bool:
    """True when a K-quant kernel of ``qtypes`` (``weighted``: or an imatrix-weighted one) has no compiled version in
    numba's on-disk cache (the first run on a machine compiles them, ~10 s each); False when all are cached or the
    cache cannot be inspected."""
    try:
        return any(not os.path.exists(f._cache._cache_file._index_path) for f in _dispatchers(qtypes, weighted))
    except Exception:  # noqa: BLE001 - numba internals; the answer only chooses a progress message
        return False


def warm_up(qtypes, weighted: bool = False) -> None:
    """Compile (or load from the cache) the K-quant kernels of ``qtypes`` on one block, before the real work
    (``weighted``: the imatrix-weighted kernels of every type that takes weights)."""
    for qtype in dict.fromkeys(qtypes):
        if qtype in K_TYPES and qtype not in WEIGHTS_REQUIRED:
            _one(np.zeros((1, 256), np.float32), qtype)
        if weighted and qtype in WEIGHTED_TYPES:
            _one(np.zeros((1, 256), np.float32), qtype, np.ones(256, np.float32))
