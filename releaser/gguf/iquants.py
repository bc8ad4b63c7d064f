"""Numba kernels for llama.cpp's 4-bit non-linear I-quants, IQ4_NL and IQ4_XS, with and without importance weights.

Both mirror the scalar C of ``ggml/src/ggml-quants.c`` (llama.cpp as vendored in llama-cpp-python 0.3.36):
``quantize_iq4_nl`` / ``quantize_iq4_xs`` over ``quantize_row_iq4_nl_impl`` with ``ntry = 7``, which llama-quantize
takes with or without an imatrix. A value is stored as the index of one of the 16 levels ``kvalues_iq4nl`` (-127 ..
113) times a scale; each 32-weight block's scale is fitted as in ``make_qx_quants``: the scale ``max / -127`` and 15
others, ``max / (itry - 127)``, each giving levels (``best_index_int8``, the nearest level) and the least-squares scale
for them under the weights ``x*x`` (without an imatrix) or ``qw * sqrt(sigma2 + x*x)`` (``sigma2``: twice the
super-block's mean square). IQ4_NL stores the fp16 scale of each 32-weight block; IQ4_XS stores one fp16 scale per
256-weight super-block (``-max_scale / 32``) and a 6-bit multiple of it per block, then re-picks every level with the
stored block scale.

As in :mod:`releaser.gguf.kquants`, every float operation is float32 in C's order (each candidate's sums sequential
over the block, no fused multiply-add); the 16 candidates of a block are summed side by side so the loop over them
vectorises. ``best_index_int8``'s binary search is done without branches: the count ``c`` of levels 1..14 at or below
``x`` gives the neighbouring levels ``kv[c] <= x < kv[c + 1]`` (also right below the first and above the last level,
where C returns 0 and 15 early), then C's float32 comparison ``x - kv[c] < kv[c + 1] - x`` picks one.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .kquants import F0, F1, GROUP_MAX_EPS, nearest_int

KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
NTRY = 7
N_CANDIDATES = 2 * NTRY + 2   # the scale -max/kv[0], then (itry + kv[0]) / max for itry = -7..7
F2 = np.float32(2.0)
F32 = np.float32(32.0)


@njit(cache=True, error_model="numpy", inline="always")
def _neighbours(x):
    """(c, kv[c], kv[c + 1]) for float32 ``x``: c = the number of levels 1..14 at or below x (0..14)."""
    c = 0
    lo = KVALUES_IQ4NL[0]
    hi = KVALUES_IQ4NL[1]
    for k in range(1, 15):
        ge = x >= KVALUES_IQ4NL[k]
        c += ge
        lo = KVALUES_IQ4NL[k] if ge else lo
        hi = KVALUES_IQ4NL[k + 1] if ge else hi
    return c, lo, hi


@njit(cache=True, error_model="numpy", inline="always")
def best_index(x):
    """ggml's ``best_index_int8(16, kvalues_iq4nl, x)`` for a finite (or infinite) float32 ``x``."""
    c, lo, hi = _neighbours(x)
    return c if x - lo < hi - x else c + 1


@njit(cache=True, error_model="numpy", inline="always")
def _block_scale(x, w, ids, sumqx, sumq2):
    """The fitted scale of one block ``x`` (32 values) under the weights ``w`` (C's search; ``ids``, ``sumqx``,
    ``sumq2``: float32 scratch of N_CANDIDATES). 0 for a block whose largest magnitude is below GROUP_MAX_EPS."""
    n = x.shape[0]
    amax = F0
    mx = F0
    for j in range(n):
        ax = abs(x[j])
        if ax > amax:
            amax = ax
            mx = x[j]
    if amax < GROUP_MAX_EPS:
        return F0
    kv0 = KVALUES_IQ4NL[0]
    ids[0] = F1 / (-mx / kv0)
    for t in range(1, N_CANDIDATES):
        ids[t] = np.float32(t - 1 - NTRY + int(kv0)) / mx
    for t in range(N_CANDIDATES):
        sumqx[t] = F0
        sumq2[t] = F0
    for j in range(n):
        xj = x[j]
        wj = w[j]
        for t in range(N_CANDIDATES):
            al = ids[t] * xj
            c, lo, hi = _neighbours(al)
            q = lo if al - lo < hi - al else hi
            wq = wj * q
            sumqx[t] += wq * xj
            sumq2[t] += wq * q
    d = sumqx[0] / sumq2[0] if sumq2[0] > F0 else F0
    best = d * sumqx[0]
    for t in range(1, N_CANDIDATES):
        if sumq2[t] > F0 and sumqx[t] * sumqx[t] > best * sumq2[t]:
            d = sumqx[t] / sumq2[t]
            best = d * sumqx[t]
    return d


@njit(cache=True, error_model="numpy", inline="always")
def _weights(x, qw, sigma2, weighted, w):
    """C's per-value weights of one block: ``qw * sqrt(sigma2 + x*x)`` with an imatrix, else ``x*x``."""
    if weighted:
        for j in range(x.shape[0]):
            w[j] = qw[j] * np.float32(np.sqrt(sigma2 + x[j] * x[j]))
    else:
        for j in range(x.shape[0]):
            w[j] = x[j] * x[j]


@njit(cache=True, error_model="numpy")
def _scratch():
    """A block's weights (32) and the candidates' inverse scales and sums (N_CANDIDATES each), float32."""
    return (np.empty(32, np.float32), np.empty(N_CANDIDATES, np.float32), np.empty(N_CANDIDATES, np.float32),
            np.empty(N_CANDIDATES, np.float32))


@njit(cache=True, error_model="numpy", inline="always")
def _sigma2(x):
    s = F0
    for j in range(x.shape[0]):
        s += x[j] * x[j]
    return s * (F2 / np.float32(x.shape[0]))


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def iq4_nl_rows(x, qw, widx, weighted):
    """IQ4_NL for rows ``x`` [R, C] (C a multiple of 32); ``qw`` [n, C] and ``widx`` [R]: the weight row of each row
    (read only when ``weighted``). Returns the level indices ``L`` [R*C/32, 32] and the block scales ``d`` [R*C/32]
    (float32, before C's fp16 rounding)."""
    R, C = x.shape
    nper = C // 32
    nb = R * nper
    L = np.empty((nb, 32), np.uint8)
    d_out = np.empty(nb, np.float32)
    chunk = 256
    for ch in prange((nb + chunk - 1) // chunk):
        w, ids, sumqx, sumq2 = _scratch()
        for b in range(ch * chunk, min(nb, (ch + 1) * chunk)):
            r = b // nper
            off = (b - r * nper) * 32
            xb = x[r, off:off + 32]
            _weights(xb, qw[widx[r], off:off + 32], _sigma2(xb) if weighted else F0, weighted, w)
            d = _block_scale(xb, w, ids, sumqx, sumq2)
            d_out[b] = d
            idl = F1 / d if d != F0 else F0   # C picks the levels with the unrounded scale
            for j in range(32):
                L[b, j] = best_index(idl * xb[j])
    return L, d_out


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def iq4_xs_rows(x, qw, widx, weighted):
    """IQ4_XS for rows ``x`` [R, C] (C a multiple of 256), weights as :func:`iq4_nl_rows`. Returns ``L``
    [R*C/256, 256], the super-block scales ``d`` [R*C/256] (float32, before fp16 rounding) and the biased 6-bit block
    scales ``ls`` [R*C/256, 8] (l + 32, 0..63)."""
    R, C = x.shape
    nper = C // 256
    nb = R * nper
    L = np.empty((nb, 256), np.uint8)
    d_out = np.empty(nb, np.float32)
    ls = np.empty((nb, 8), np.uint8)
    chunk = 32
    for ch in prange((nb + chunk - 1) // chunk):
        w, ids, sumqx, sumq2 = _scratch()
        scales = np.empty(8, np.float32)
        for b in range(ch * chunk, min(nb, (ch + 1) * chunk)):
            r = b // nper
            off = (b - r * nper) * 256
            xs = x[r, off:off + 256]
            sigma2 = _sigma2(xs) if weighted else F0
            max_scale = F0
            amax_scale = F0
            for ib in range(8):
                xb = xs[32 * ib:32 * ib + 32]
                _weights(xb, qw[widx[r], off + 32 * ib:off + 32 * ib + 32], sigma2, weighted, w)
                s = _block_scale(xb, w, ids, sumqx, sumq2)
                scales[ib] = s
                if abs(s) > amax_scale:
                    amax_scale = abs(s)
                    max_scale = s
            d = -max_scale / F32   # an all-zero super-block stores -0.0, as C does
            d_out[b] = d
            id_ = F1 / d if d != F0 else F0
            for ib in range(8):
                l = max(-32, min(31, nearest_int(id_ * scales[ib])))
                dl = d * np.float32(l)
                idl = F1 / dl if dl != F0 else F0
                for j in range(32):
                    L[b, 32 * ib + j] = best_index(idl * xs[32 * ib + j])
                ls[b, ib] = l + 32
    return L, d_out, ls


KERNELS = (iq4_nl_rows, iq4_xs_rows)
