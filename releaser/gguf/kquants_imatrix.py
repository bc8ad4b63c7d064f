"""llama.cpp's imatrix-weighted quantization (``quant_weights`` given): numba kernels and one small class per type.

Each kernel mirrors the scalar C of ``ggml/src/ggml-quants.c`` (llama.cpp as vendored in llama-cpp-python 0.3.36) on
the path ``quantize_qX(..., quant_weights != NULL)`` takes: ``quantize_row_q{2,3,4,5,6}_K_impl`` and
``quantize_row_q{4,5}_{0,1}_impl`` with ``make_qkx3_quants``, ``make_qp_quants`` and the weighted
``make_qx_quants``. As in :mod:`releaser.gguf.kquants`, every float operation is float32 in C's order (sequential
sums, no fused multiply-add), so the bytes are llama.cpp's. The weight of a value is the imatrix entry of its column
``qw[c]``, times ``sqrt(sigma2 + x*x)`` for every type but Q6_K (which takes ``qw`` as it is); ``sigma2`` is the
super-block's mean square (Q2_K: ``sum x^2 / 256``; Q3_K..Q5_K: ``2 sum x^2 / 256``) or, for the 32-weight types,
the whole row's (``sum x^2 / n_per_row``).

Q8_0 and the float types take no weights (llama.cpp ignores them there).

The kernels take the rows ``x`` [R, C] (as super-blocks [R*C/256, 256] for the K-quants), the distinct weight rows
``qw`` [n, C] and ``widx`` [R], the weight row of each data row (one per expert of a mixture-of-experts tensor, as
llama-quantize's ``imatrix + (row / nrows_per_expert) * n_per_row``). Packing reuses the classes of
:mod:`releaser.gguf.quants`.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import quants
from . import kquants
from .kquants import CHUNK, F0, GROUP_MAX_EPS, N_QX_CANDIDATES, QK_K, fp16_round, nearest_int, qkx2_scratch

# make_qkx3_quants with weights is make_qkx2_quants: the same function, compiled here once and called (not inlined
# into every kernel: numba's compile time, not the run time, is what inlining costs), with its error model (a zero
# determinant gives inf, masked after; Python's would raise)
make_qkx2_quants = njit(cache=True, error_model="numpy")(kquants.make_qkx2_quants.py_func)
make_qx_quants_w = njit(cache=True)(kquants.make_qx_quants.py_func)   # with ``qw`` as the weights

RMIN = np.float32(-0.9)   # make_qkx3_quants' search: rmin -0.9, rdelta 0.05, 37 steps (every weighted asymmetric type)
RDELTA = np.float32(0.05)
NSTEP = 36
F2 = np.float32(2.0)
F256 = np.float32(256.0)
QP_TENTH = np.float32(0.1)


@njit(cache=True)
def make_qp_quants(x, L, nmax, qw):
    """ggml's make_qp_quants: the non-negative super-block scales (or mins) ``x`` to levels 0..nmax under the weights
    ``qw``; writes ``L`` (as C's uint8, wrapped to 0..255) and returns the super-block scale."""
    n = x.shape[0]
    mx = F0
    for i in range(n):
        mx = mx if mx > x[i] else x[i]   # C's MAX(max, x[i])
    if mx < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F0
    fnmax = np.float32(nmax)
    iscale = fnmax / mx
    for i in range(n):
        L[i] = nearest_int(iscale * x[i]) & 0xFF
    scale = np.float32(1.0) / iscale
    best_mse = F0
    for i in range(n):
        diff = x[i] - scale * np.float32(L[i])
        best_mse += qw[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (QP_TENTH * np.float32(step) + fnmax) / mx
        scale_is = np.float32(1.0) / iscale_is
        mse = F0
        for i in range(n):
            l = min(nmax, nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * np.float32(l)
            mse += qw[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = F0
    suml2 = F0
    for i in range(n):
        l = min(nmax, nearest_int(iscale * x[i]))
        L[i] = l & 0xFF
        fl = np.float32(l)
        sumlx += qw[i] * x[i] * fl
        suml2 += qw[i] * fl * fl
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = qw[i]
            fli = np.float32(L[i])
            slx = sumlx - w * x[i] * fli
            sl2 = suml2 - w * fli * fli
            if slx > F0 and sl2 > F0:
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    fnl = np.float32(new_l)
                    slx += w * x[i] * fnl
                    sl2 += w * fnl * fnl
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > F0 else F0


@njit(cache=True, inline="always")
def _block_weights(x, i, w, sigma2, wt):
    """``wt[l, j] = w[n*j + l] * sqrt(sigma2 + x[i, n*j + l]^2)`` for the m sub-blocks j of n weights of super-block i
    (``wt`` [n, m]; ``w``: the super-block's 256 imatrix weights)."""
    n, m = wt.shape
    for j in range(m):
        for l in range(n):
            v = x[i, n * j + l]
            wt[l, j] = w[n * j + l] * np.float32(np.sqrt(sigma2 + v * v))


@njit(cache=True)
def _qkx3_super_block(x, i, w, sigma2, scratch, nmax, pmax, scales, mins, sw, Ls, Lm, L):
    """The first half of quantize_row_q2_K_impl / q4_K / q5_K: make_qkx3_quants on each sub-block of super-block i
    (levels 0..nmax, weights ``w * sqrt(sigma2 + x^2)``), then make_qp_quants of the sub-block scales and mins (levels
    0..pmax, weighted by each sub-block's sum of weights). Writes the levels into ``L[i]`` and ``Ls``, ``Lm``; returns
    the fp16-rounded ``d`` and ``dmin``."""
    xt, wt, Lt = scratch[0], scratch[1], scratch[2]
    n, m = xt.shape
    _block_weights(x, i, w, sigma2, wt)
    for j in range(m):
        s = F0
        for k in range(n):
            xt[k, j] = x[i, n * j + k]
            s += wt[k, j]
        sw[j] = s
    make_qkx2_quants(scratch, nmax, RMIN, RDELTA, NSTEP, False, scales, mins)
    for j in range(m):
        for k in range(n):
            L[i, n * j + k] = Lt[k, j]
    return fp16_round(make_qp_quants(scales, Ls, pmax, sw)), fp16_round(make_qp_quants(mins, Lm, pmax, sw))


@njit(cache=True, inline="always")
def _sum_x2(x, i):
    s = F0
    for k in range(x.shape[1]):
        s += x[i, k] * x[i, k]
    return s


@njit(cache=True, parallel=True)
def q2_k_blocks_w(x, qw, widx, nbr):
    """quantize_row_q2_K_impl for super-blocks ``x`` [nb, 256] (``nbr`` per row): ``L`` (0..3), ``d``, ``dmin`` and
    the 4+4-bit ``scales`` [nb, 16], as :func:`releaser.gguf.kquants.q2_k_blocks` returns them."""
    nb = x.shape[0]
    L = np.empty((nb, QK_K), np.uint8)
    sc = np.empty((nb, 16), np.uint8)
    d_out = np.empty(nb, np.float32)
    dmin_out = np.empty(nb, np.float32)
    for c in prange((nb + CHUNK - 1) // CHUNK):
        scratch = qkx2_scratch(16, 16)
        scales, mins, sw = np.empty(16, np.float32), np.empty(16, np.float32), np.empty(16, np.float32)
        Ls, Lm = np.empty(16, np.int32), np.empty(16, np.int32)
        for i in range(c * CHUNK, min(nb, (c + 1) * CHUNK)):
            col = (i % nbr) * QK_K
            d, dmin = _qkx3_super_block(x, i, qw[widx[i // nbr], col:col + QK_K], _sum_x2(x, i) / F256, scratch, 3,
                                        15, scales, mins, sw, Ls, Lm, L)
            d_out[i] = d
            dmin_out[i] = dmin
            for j in range(16):
                sc[i, j] = (Ls[j] | (Lm[j] << 4)) & 0xFF
            for j in range(16):
                dj = d * np.float32(sc[i, j] & 0xF)
                if dj == F0:
                    continue
                dm = dmin * np.float32(sc[i, j] >> 4)
                for k in range(16):
                    L[i, 16 * j + k] = max(0, min(3, nearest_int((x[i, 16 * j + k] + dm) / dj)))
    return L, d_out, dmin_out, sc


@njit(cache=True, parallel=True)
def q3_k_blocks_w(x, qw, widx, nbr):
    """quantize_row_q3_K_impl: ``L`` (0..7), ``d`` and the 6-bit biased scales ``sc`` [nb, 16]."""
    nb = x.shape[0]
    L = np.empty((nb, QK_K), np.uint8)
    sc = np.empty((nb, 16), np.uint8)
    d_out = np.empty(nb, np.float32)
    for c in prange((nb + CHUNK - 1) // CHUNK):
        wt = np.empty((16, 16), np.float32)
        weight = np.empty(16, np.float32)
        Lq = np.empty(16, np.int32)
        Lsc = np.empty(16, np.int32)
        iscales = np.empty(N_QX_CANDIDATES, np.float32)
        sumlx = np.empty(N_QX_CANDIDATES, np.float32)
        suml2 = np.empty(N_QX_CANDIDATES, np.float32)
        wx = np.empty(16, np.float32)
        scales = np.empty(16, np.float32)
        sw = np.empty(16, np.float32)
        for i in range(c * CHUNK, min(nb, (c + 1) * CHUNK)):
            col = (i % nbr) * QK_K
            _block_weights(x, i, qw[widx[i // nbr], col:col + QK_K], F2 * _sum_x2(x, i) / F256, wt)
            for j in range(16):
                s = F0
                for k in range(16):
                    weight[k] = wt[k, j]
                    s += wt[k, j]
                sw[j] = s
                scales[j] = make_qx_quants_w(x[i, 16 * j:16 * j + 16], Lq, 4, weight, wx, iscales, sumlx, suml2)
                for k in range(16):
                    L[i, 16 * j + k] = Lq[k]
            d = fp16_round(make_qx_quants_w(scales, Lsc, 32, sw, wx, iscales, sumlx, suml2))
            d_out[i] = d
            for j in range(16):
                sc[i, j] = Lsc[j]
            for j in range(16):
                dj = d * np.float32(Lsc[j] - 32)
                if dj == F0:
                    continue
                for k in range(16):
                    L[i, 16 * j + k] = max(-4, min(3, nearest_int(x[i, 16 * j + k] / dj))) + 4
    return L, d_out, sc


@njit(cache=True, parallel=True)
def qkx_blocks_w(x, qw, widx, nbr, nmax):
    """quantize_row_q4_K_impl (nmax 15) / quantize_row_q5_K_impl (nmax 31): ``L``, ``d``, ``dmin`` and the 6-bit
    ``ls``, ``lm`` [nb, 8], as :func:`releaser.gguf.kquants.qkx_blocks` returns them."""
    nb = x.shape[0]
    L = np.empty((nb, QK_K), np.uint8)
    ls = np.empty((nb, 8), np.uint8)
    lm = np.empty((nb, 8), np.uint8)
    d_out = np.empty(nb, np.float32)
    dmin_out = np.empty(nb, np.float32)
    for c in prange((nb + CHUNK - 1) // CHUNK):
        scratch = qkx2_scratch(32, 8)
        scales, mins, sw = np.empty(8, np.float32), np.empty(8, np.float32), np.empty(8, np.float32)
        Ls, Lm = np.empty(8, np.int32), np.empty(8, np.int32)
        for i in range(c * CHUNK, min(nb, (c + 1) * CHUNK)):
            col = (i % nbr) * QK_K
            d, dmin = _qkx3_super_block(x, i, qw[widx[i // nbr], col:col + QK_K], F2 * _sum_x2(x, i) / F256,
                                        scratch, nmax, 63, scales, mins, sw, Ls, Lm, L)
            d_out[i] = d
            dmin_out[i] = dmin
            for j in range(8):
                # Q5_K clamps to 63 (a no-op for C's uint8 unless a level wrapped); the 12 packed bytes decode as & 63
                ls[i, j] = min(63, Ls[j]) if nmax == 31 else Ls[j]
                lm[i, j] = min(63, Lm[j]) if nmax == 31 else Lm[j]
            for j in range(8):
                dj = d * np.float32(ls[i, j] & 63)
                if dj == F0:
                    continue
                dm = dmin * np.float32(lm[i, j] & 63)
                for k in range(32):
                    L[i, 32 * j + k] = max(0, min(nmax, nearest_int((x[i, 32 * j + k] + dm) / dj)))
    return L, d_out, dmin_out, ls, lm


@njit(cache=True, parallel=True)
def q6_k_blocks_w(x, qw, widx, nbr):
    """quantize_row_q6_K_impl: make_qx_quants weighted by ``qw`` itself; ``L`` (0..63), ``d``, int8 scales ``sc``."""
    nb = x.shape[0]
    L = np.empty((nb, QK_K), np.uint8)
    sc = np.empty((nb, 16), np.uint8)
    d_out = np.empty(nb, np.float32)
    for c in prange((nb + CHUNK - 1) // CHUNK):
        Lq = np.empty(16, np.int32)
        iscales = np.empty(N_QX_CANDIDATES, np.float32)
        sumlx = np.empty(N_QX_CANDIDATES, np.float32)
        suml2 = np.empty(N_QX_CANDIDATES, np.float32)
        wx = np.empty(16, np.float32)
        scales = np.empty(16, np.float32)
        for i in range(c * CHUNK, min(nb, (c + 1) * CHUNK)):
            row = widx[i // nbr]
            col = (i % nbr) * QK_K
            max_scale = F0
            max_abs_scale = F0
            for j in range(16):
                s = make_qx_quants_w(x[i, 16 * j:16 * j + 16], Lq, 32, qw[row, col + 16 * j:col + 16 * j + 16], wx,
                                     iscales, sumlx, suml2)
                for k in range(16):
                    L[i, 16 * j + k] = Lq[k]
                scales[j] = s
                if abs(s) > max_abs_scale:
                    max_abs_scale = abs(s)
                    max_scale = s
            if max_abs_scale < GROUP_MAX_EPS:  # the whole block is written as zero bytes
                for k in range(QK_K):
                    L[i, k] = 0
                for j in range(16):
                    sc[i, j] = 0
                d_out[i] = F0
                continue
            iscale = np.float32(-128.0) / max_scale
            d = fp16_round(np.float32(1.0) / iscale)
            d_out[i] = d
            for j in range(16):
                sc[i, j] = min(127, nearest_int(iscale * scales[j])) & 0xFF
            for j in range(16):
                dj = d * np.float32(((np.int32(sc[i, j]) + 128) & 0xFF) - 128)
                if dj == F0:
                    continue
                for k in range(16):
                    L[i, 16 * j + k] = max(-32, min(31, nearest_int(x[i, 16 * j + k] / dj))) + 32
    return L, d_out, sc


@njit(cache=True, inline="always")
def _row_sigma2(x, r):
    s = F0
    for k in range(x.shape[1]):
        s += x[r, k] * x[r, k]
    return s / np.float32(x.shape[1])


@njit(cache=True, parallel=True)
def qx_rows_w(x, qw, widx, nmax):
    """quantize_row_q4_0_impl (nmax 8) / quantize_row_q5_0_impl (nmax 16) on rows ``x`` [R, C]: ``L`` [R, C]
    (0..2*nmax-1) and the unrounded scales ``d`` [R, C/32]."""
    R, C = x.shape
    nb = C // 32
    L = np.empty((R, C), np.uint8)
    d_out = np.empty((R, nb), np.float32)
    for r in prange(R):
        weight = np.empty(32, np.float32)
        Lq = np.empty(32, np.int32)
        iscales = np.empty(N_QX_CANDIDATES, np.float32)
        sumlx = np.empty(N_QX_CANDIDATES, np.float32)
        suml2 = np.empty(N_QX_CANDIDATES, np.float32)
        wx = np.empty(32, np.float32)
        sigma2 = _row_sigma2(x, r)
        w = widx[r]
        for b in range(nb):
            for k in range(32):
                v = x[r, 32 * b + k]
                weight[k] = qw[w, 32 * b + k] * np.float32(np.sqrt(sigma2 + v * v))
            d_out[r, b] = make_qx_quants_w(x[r, 32 * b:32 * b + 32], Lq, nmax, weight, wx, iscales, sumlx, suml2)
            for k in range(32):
                L[r, 32 * b + k] = Lq[k]
    return L, d_out


@njit(cache=True, parallel=True)
def qkx_rows_w(x, qw, widx, nmax):
    """quantize_row_q4_1_impl (nmax 15) / quantize_row_q5_1_impl (nmax 31): ``L`` [R, C], the unrounded scales
    ``d`` and minimums ``m`` [R, C/32] (make_qkx3_quants on each 32-weight block, eight blocks side by side)."""
    R, C = x.shape
    nb = C // 32
    L = np.empty((R, C), np.uint8)
    d_out = np.empty((R, nb), np.float32)
    m_out = np.empty((R, nb), np.float32)
    for r in prange(R):
        scales = np.empty(8, np.float32)
        mins = np.empty(8, np.float32)
        sigma2 = _row_sigma2(x, r)
        w = widx[r]
        for b0 in range(0, nb, 8):
            m = min(8, nb - b0)
            scratch = qkx2_scratch(32, m)
            xt, wt, Lt = scratch[0], scratch[1], scratch[2]
            for j in range(m):
                for k in range(32):
                    v = x[r, 32 * (b0 + j) + k]
                    xt[k, j] = v
                    wt[k, j] = qw[w, 32 * (b0 + j) + k] * np.float32(np.sqrt(sigma2 + v * v))
            make_qkx2_quants(scratch, nmax, RMIN, RDELTA, NSTEP, False, scales, mins)
            for j in range(m):
                d_out[r, b0 + j] = scales[j]
                m_out[r, b0 + j] = -mins[j]
                for k in range(32):
                    L[r, 32 * (b0 + j) + k] = Lt[k, j]
    return L, d_out, m_out


# -- one class per type: the weighted search, then the unweighted type's packing --------------------------------------
class Q2_K(quants.Q2_K):
    @classmethod
    def quantize_rows(cls, rows: np.ndarray, qw: np.ndarray, widx: np.ndarray) -> np.ndarray:
        return cls.pack(*q2_k_blocks_w(rows.reshape(-1, QK_K), qw, widx, rows.shape[1] // QK_K))


class Q3_K(quants.Q3_K):
    @classmethod
    def quantize_rows(cls, rows: np.ndarray, qw: np.ndarray, widx: np.ndarray) -> np.ndarray:
        return cls.pack(*q3_k_blocks_w(rows.reshape(-1, QK_K), qw, widx, rows.shape[1] // QK_K))


class Q4_K(quants.Q4_K):
    @classmethod
    def quantize_rows(cls, rows: np.ndarray, qw: np.ndarray, widx: np.ndarray) -> np.ndarray:
        return cls.pack(*qkx_blocks_w(rows.reshape(-1, QK_K), qw, widx, rows.shape[1] // QK_K, cls.nmax))


class Q5_K(quants.Q5_K, Q4_K):
    pass


class Q6_K(quants.Q6_K):
    @classmethod
    def quantize_rows(cls, rows: np.ndarray, qw: np.ndarray, widx: np.ndarray) -> np.ndarray:
        return cls.pack(*q6_k_blocks_w(rows.reshape(-1, QK_K), qw, widx, rows.shape[1] // QK_K))


def _nibbles(L: np.ndarray) -> np.ndarray:
    """[n, 32] levels -> the 16 ``qs`` bytes of a 32-weight block: byte j holds L[j] & 15 | (L[j + 16] & 15) << 4."""
    return (L[:, :16] & 0xF) | ((L[:, 16:] & 0xF) << 4)


def _high_bits(L: np.ndarray) -> np.ndarray:
    """[n, 32] 5-bit levels -> Q5_0/Q5_1's little-endian uint32 ``qh``: bit j is bit 4 of L[j]."""
    bits = ((L >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return np.bitwise_or.reduce(bits, axis=1).astype("<u4").view(np.uint8).reshape(-1, 4)


class Q4_0(quants.Q4_0):
    nsym, qh = 8, False   # make_qx_quants' nmax; Q5_0 stores a fifth bit per weight in qh

    @classmethod
    def quantize_rows(cls, rows: np.ndarray, qw: np.ndarray, widx: np.ndarray) -> np.ndarray:
        L, d = qx_rows_w(rows, qw, widx, cls.nsym)
        L = L.reshape(-1, 32)
        parts = [quants._f16_bytes(d.reshape(-1)), *([_high_bits(L)] if cls.qh else []), _nibbles(L)]
        return np.concatenate(parts, axis=1).reshape(rows.shape[0], -1)


class Q5_0(quants.Q5_0, Q4_0):
    nsym, qh = 16, True


class Q4_1(quants.Q4_1):
    qh = False

    @classmethod
    def quantize_rows(cls, rows: np.ndarray, qw: np.ndarray, widx: np.ndarray) -> np.ndarray:
        L, d, m = qkx_rows_w(rows, qw, widx, cls.nmax)
        L = L.reshape(-1, 32)
        parts = [quants._f16_bytes(d.reshape(-1)), quants._f16_bytes(m.reshape(-1)),
                 *([_high_bits(L)] if cls.qh else []), _nibbles(L)]
        return np.concatenate(parts, axis=1).reshape(rows.shape[0], -1)


class Q5_1(quants.Q5_1, Q4_1):
    qh = True


WEIGHTED = {c.qtype: c for c in (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q4_0, Q4_1, Q5_0, Q5_1)}
KERNELS = (q2_k_blocks_w, q3_k_blocks_w, qkx_blocks_w, q6_k_blocks_w, qx_rows_w, qkx_rows_w)
