"""Numba kernels for llama.cpp's reference (non-imatrix) K-quant search, one super-block of 256 weights at a time.

Each kernel mirrors the scalar C of ``ggml/src/ggml-quants.c`` (llama.cpp as vendored in llama-cpp-python 0.3.36):
``quantize_row_q{2,3,4,5,6}_K_ref`` with ``make_qkx2_quants``, ``make_q3_quants`` and ``make_qx_quants``. Every
float operation is done in float32, in the same order as the C code (sequential sums, no fused multiply-add), so the
results are bit-identical. The kernels return the quant levels ``L`` and the per-block scales; the bit packing into
llama.cpp's block layout is done, vectorised, by the classes in :mod:`releaser.gguf.quants`.

Speed comes from SIMD across independent sub-blocks, never from reordering one sub-block's arithmetic: the searches
lay many sub-blocks side by side as columns (Q4_K/Q5_K: ``QKX_GROUP`` super-blocks at a time) so each loop over the
columns vectorises, the per-column bookkeeping uses selects instead of branches, levels are kept as exact float32
integers, and ``error_model="numpy"`` drops Python's zero-division checks (every division here is either guarded, as
in C, or, like C's, allowed to give inf/NaN that a select then discards).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

QK_K = 256
CHUNK = 64  # super-blocks per parallel work item (scratch buffers are allocated once per chunk)

F0 = np.float32(0.0)
F1 = np.float32(1.0)
MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: adding it rounds to an integer, ties to even
NEAREST_INT_SAFE = np.float32(4194303.0)
HALF_SAFE = np.float32(2097152.0)  # a bound with margin for float32 rounding of the per-element product
GROUP_MAX_EPS = np.float32(1e-15)
ONE_TENTH = np.float32(0.1)


@njit(cache=True, error_model="numpy")
def _magic_bits(val):
    """``(bits(val) & 0x7fffff) - 0x400000`` for a float32 ``val``, computed arithmetically (large, inf or NaN input)."""
    if val != val:  # a quiet NaN has mantissa 0x400000
        return 0
    a = abs(np.float64(val))
    if a == math.inf or a == 0.0:
        return -0x400000
    m, e = math.frexp(a)  # a = m * 2**e, m in [0.5, 1)
    return int((2.0 * m - 1.0) * 8388608.0) - 0x400000


@njit(cache=True, error_model="numpy", inline="always")
def nearest_int(fval):
    """ggml's ``nearest_int``: round a float32 to the nearest integer, ties to even (the 12582912 trick)."""
    val = fval + MAGIC
    if abs(fval) <= NEAREST_INT_SAFE:
        return int(val - MAGIC)
    return _magic_bits(val)


@njit(cache=True, error_model="numpy", inline="always")
def nearest_small(fval):
    """``nearest_int`` for a finite argument known to satisfy |fval| <= 4194303 (bounded search loops): branch-free."""
    return int((fval + MAGIC) - MAGIC)


@njit(cache=True, error_model="numpy", inline="always")
def fp16_round(f):
    """The float32 value of ``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(f))`` (IEEE half, round to nearest even)."""
    if f != f:
        return f
    a = abs(np.float64(f))
    if a >= 65520.0:
        r = math.inf
    elif a < 6.103515625e-05:  # below 2**-14: half subnormals, quantum 2**-24
        r = np.rint(a * 16777216.0) / 16777216.0
    else:
        m, e = math.frexp(a)
        q = math.ldexp(1.0, e - 11)  # 11 significant bits
        r = np.rint(a / q) * q
    return np.float32(math.copysign(r, np.float64(f)))


@njit(cache=True, error_model="numpy", inline="always")
def shifted_levels(xt, mn, iscale, nmax, out, small):
    """``out[i, j] = clamp(nearest_int(iscale[j] * (xt[i, j] - mn[j])), 0, nmax)``; ``small``: all arguments bounded."""
    n, m = xt.shape
    if small:  # separate loops so the common case is branch-free and vectorises
        for i in range(n):
            for j in range(m):
                out[i, j] = max(0, min(nmax, nearest_small(iscale[j] * (xt[i, j] - mn[j]))))
    else:
        for i in range(n):
            for j in range(m):
                out[i, j] = max(0, min(nmax, nearest_int(iscale[j] * (xt[i, j] - mn[j]))))


@njit(cache=True, error_model="numpy", inline="always")
def requantize(x, shift, d, lo, hi, q, out):
    """``out[k] = clamp(nearest_int((x[k] + shift) / d), lo, hi)`` (C's final pass with the stored scales); ``q`` is
    float32 scratch of len(x). The quotients are bounded in practice, so the branch-free rounding runs unless one is
    not (then ggml's exact nearest_int for all)."""
    n = x.shape[0]
    small = True
    for k in range(n):
        v = (x[k] + shift) / d
        q[k] = v
        small &= abs(v) <= NEAREST_INT_SAFE
    if small:
        for k in range(n):
            out[k] = max(lo, min(hi, nearest_small(q[k])))
    else:
        for k in range(n):
            out[k] = max(lo, min(hi, nearest_int(q[k])))


@njit(cache=True, error_model="numpy")
def qkx2_scratch(n, m):
    """Work arrays for :func:`make_qkx2_quants` on m sub-blocks of n weights."""
    return (np.empty((n, m), np.float32), np.empty((n, m), np.float32), np.empty((n, m), np.int32),
            np.empty((n, m), np.float32), np.empty((16, m), np.float32), np.empty((2, m), np.uint8))


@njit(cache=True, error_model="numpy", inline="always")
def _level_sums(xt, wt, mn, iscale, fnmax, small, Lf, sum_l, sum_l2, sum_xl):
    """One candidate of make_qkx2_quants: ``Lf = clamp(nearest_int(iscale * (x - mn)), 0, nmax)`` (as float32, exact
    integers) and C's three weighted sums over it, each sequential over i as in C; ``small``: all arguments bounded."""
    n, m = xt.shape
    for j in range(m):
        sum_l[j] = F0
        sum_l2[j] = F0
        sum_xl[j] = F0
    if small:  # the common case: branch-free rounding, one pass that vectorises across the sub-blocks j
        for i in range(n):
            for j in range(m):
                fl = max(F0, min(fnmax, (iscale[j] * (xt[i, j] - mn[j]) + MAGIC) - MAGIC))
                Lf[i, j] = fl
                wl = wt[i, j] * fl
                sum_l[j] += wl
                sum_l2[j] += wl * fl
                sum_xl[j] += wl * xt[i, j]
    else:
        nmax = int(fnmax)
        for i in range(n):
            for j in range(m):
                fl = np.float32(max(0, min(nmax, nearest_int(iscale[j] * (xt[i, j] - mn[j])))))
                Lf[i, j] = fl
                wl = wt[i, j] * fl
                sum_l[j] += wl
                sum_l2[j] += wl * fl
                sum_xl[j] += wl * xt[i, j]


@njit(cache=True, error_model="numpy", inline="always")
def _fit_error(xt, wt, Lf, scale, mn, use_mad, err):
    """``err[j] = sum_i w * |scale*L + mn - x|`` (use_mad) or the squared form, sequential over i as in C."""
    n, m = xt.shape
    for j in range(m):
        err[j] = F0
    if use_mad:
        for i in range(n):
            for j in range(m):
                err[j] += wt[i, j] * abs(scale[j] * Lf[i, j] + mn[j] - xt[i, j])
    else:
        for i in range(n):
            for j in range(m):
                diff = scale[j] * Lf[i, j] + mn[j] - xt[i, j]
                err[j] += wt[i, j] * (diff * diff)


@njit(cache=True, error_model="numpy", inline="always")
def make_qkx2_quants(scratch, nmax, rmin, rdelta, nstep, use_mad, scales, mins):
    """ggml's make_qkx2_quants (asymmetric scale and -min fit to levels 0..nmax) on m sub-blocks side by side.

    ``scratch`` comes from :func:`qkx2_scratch`; the caller fills ``xt``/``wt`` [n, m] (sub-block j is column j) and
    reads the levels from ``Lt`` [n, m]. Every sub-block follows C's sequence of float32 operations exactly (its own
    sequential sums, the in-place min update); running them side by side only lets the CPU overlap the independent
    dependency chains (and vectorise them). Writes ``scales[j]`` and ``mins[j]`` (C's return value and ``the_min``).
    Instead of copying the levels of each better candidate, C's ``L = Laux``, it remembers that candidate's ``iscale``
    and ``min`` and recomputes its levels once at the end (the same rounding of the same float32 values).
    """
    xt, wt, Lt, Laux, st, flags = scratch
    n, m = xt.shape
    mn, mx, sum_w, sum_x, best, scale, iscale = st[0], st[1], st[2], st[3], st[4], st[5], st[6]
    sum_l, sum_l2, sum_xl, cur, tscale, tmin, xmin = st[7], st[8], st[9], st[10], st[11], st[12], st[13]
    best_iscale, best_mn = st[14], st[15]  # the candidate whose levels are kept: recomputed once at the end
    live, ok = flags[0], flags[1]
    for j in range(m):
        mn[j] = xt[0, j]
        mx[j] = xt[0, j]
        sum_w[j] = wt[0, j]
        sum_x[j] = wt[0, j] * xt[0, j]
    for i in range(1, n):
        for j in range(m):
            v = xt[i, j]
            if v < mn[j]:
                mn[j] = v
            if v > mx[j]:
                mx[j] = v
            sum_w[j] += wt[i, j]
            sum_x[j] += wt[i, j] * v
    fnmax = np.float32(nmax)
    for j in range(m):
        xmin[j] = mn[j]  # the data minimum, for the rounding bound below
        if mn[j] > F0:
            mn[j] = F0
        live[j] = mx[j] != mn[j]  # a flat sub-block keeps L = 0 and scale 0
        iscale[j] = fnmax / (mx[j] - mn[j]) if live[j] else F0
        scale[j] = F1 / iscale[j] if live[j] else F0
    # mn <= min(x): arguments lie in [0, nmax]; the sums are not needed, only the levels (sum_* are scratch here)
    _level_sums(xt, wt, mn, iscale, fnmax, True, Laux, sum_l, sum_l2, sum_xl)
    _fit_error(xt, wt, Laux, scale, mn, use_mad, best)
    for j in range(m):
        best_iscale[j] = iscale[j]
        best_mn[j] = mn[j]
    for step in range(nstep + 1 if nstep >= 1 else 0):
        # per-sub-block bookkeeping without branches (selects), so these loops vectorise across the sub-blocks too
        num = rmin + rdelta * np.float32(step) + fnmax
        big = False
        for j in range(m):
            iscale[j] = num / (mx[j] - mn[j]) if live[j] else F0
            # |iscale * (x - mn)| is small unless an updated (fitted) min left the data range far behind
            big |= not abs(iscale[j]) * max(abs(mx[j] - mn[j]), abs(xmin[j] - mn[j])) <= HALF_SAFE
        _level_sums(xt, wt, mn, iscale, fnmax, not big, Laux, sum_l, sum_l2, sum_xl)
        for j in range(m):
            D = sum_w[j] * sum_l2[j] - sum_l[j] * sum_l[j]
            this_scale = (sum_w[j] * sum_xl[j] - sum_x[j] * sum_l[j]) / D
            this_min = (sum_l2[j] * sum_x[j] - sum_l[j] * sum_xl[j]) / D
            clamped = this_min > F0
            this_scale = sum_xl[j] / sum_l2[j] if clamped else this_scale
            this_min = F0 if clamped else this_min
            okj = (live[j] != 0) & (D > F0)
            ok[j] = okj
            tscale[j] = this_scale if okj else F0
            tmin[j] = this_min if okj else F0
        _fit_error(xt, wt, Laux, tscale, tmin, use_mad, cur)
        for j in range(m):
            better = (ok[j] != 0) & (cur[j] < best[j])
            best_iscale[j] = iscale[j] if better else best_iscale[j]
            best_mn[j] = mn[j] if better else best_mn[j]
            best[j] = cur[j] if better else best[j]
            scale[j] = tscale[j] if better else scale[j]
            mn[j] = tmin[j] if better else mn[j]  # later candidates use the updated min, as in C
    big = False
    for j in range(m):
        big |= not abs(best_iscale[j]) * max(abs(mx[j] - best_mn[j]), abs(xmin[j] - best_mn[j])) <= HALF_SAFE
    small = not big
    shifted_levels(xt, best_mn, best_iscale, nmax, Lt, small)
    for j in range(m):
        scales[j] = scale[j]
        mins[j] = -mn[j]


N_QX_CANDIDATES = 19  # C's first iscale = -nmax/max, then -(nmax + 0.1*is)/max for is = -9..9, is != 0


@njit(cache=True, error_model="numpy", inline="always")
def make_qx_quants(x, L, nmax, w, wx, iscales, sumlx, suml2):
    """Symmetric scale fit (rmse_type 1) under the weights ``w`` (``x*x`` without an importance matrix, as C's
    ``quant_weights == NULL`` path computes them); writes ``L`` (offset by nmax), returns the scale.

    The candidate scales do not depend on each other, so their sums are accumulated side by side (each one still
    sequentially over ``i``, as in C) and C's keep-the-best walk runs afterwards; ``wx`` = w*x is the same float32
    value C recomputes per candidate. ``wx`` (len(x)) and ``iscales``, ``sumlx``, ``suml2`` (N_QX_CANDIDATES) are
    float32 scratch.
    """
    n = x.shape[0]
    mx = F0
    amax = F0
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F0
    fnmax = np.float32(nmax)
    iscales[0] = -fnmax / mx
    for c in range(1, N_QX_CANDIDATES):
        step = c - 10 if c < 10 else c - 9
        iscales[c] = -(fnmax + ONE_TENTH * np.float32(step)) / mx
    for c in range(N_QX_CANDIDATES):
        sumlx[c] = F0
        suml2[c] = F0
    for i in range(n):
        wx[i] = w[i] * x[i]
    for i in range(n):  # |iscale * x| <= nmax + 0.9: the branch-free rounding is exact
        xi = x[i]
        wi = w[i]
        wxi = wx[i]
        for c in range(N_QX_CANDIDATES):
            fl = np.float32(max(-nmax, min(nmax - 1, nearest_small(iscales[c] * xi))))
            sumlx[c] += wxi * fl
            suml2[c] += wi * fl * fl
    scale = sumlx[0] / suml2[0] if suml2[0] != F0 else F0
    best = scale * sumlx[0]
    chosen = 0
    for c in range(1, N_QX_CANDIDATES):
        if suml2[c] > F0 and sumlx[c] * sumlx[c] > best * suml2[c]:
            scale = sumlx[c] / suml2[c]
            best = scale * sumlx[c]
            chosen = c
    for i in range(n):
        L[i] = nmax + max(-nmax, min(nmax - 1, nearest_small(iscales[chosen] * x[i])))
    return scale


@njit(cache=True, error_model="numpy", inline="always")
def make_q3_quants(x, L, nmax):
    """Symmetric fit with iterative per-weight refinement (do_rmse); writes ``L`` (offset by nmax), returns scale."""
    n = x.shape[0]
    mx = F0
    amax = F0
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F0
    iscale = -np.float32(nmax) / mx
    sumlx = F0
    suml2 = F0
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_small(iscale * x[i])))
        L[i] = l
        w = x[i] * x[i]
        fl = np.float32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = x[i] * x[i]
            fli = np.float32(L[i])
            slx = sumlx - w * x[i] * fli
            if slx > F0:
                sl2 = suml2 - w * fli * fli
                new_l = max(-nmax, min(nmax - 1, nearest_int(x[i] * sl2 / slx)))
                if new_l != L[i]:
                    fnl = np.float32(new_l)
                    slx += w * x[i] * fnl
                    sl2 += w * fnl * fnl
                    if sl2 > F0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > F0 else F0


QKX_GROUP = 16  # super-blocks searched side by side (their 8 sub-blocks each are independent columns of one search)


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def qkx_blocks(x, nmax, rmin, rdelta, nstep):
    """Q4_K (nmax 15) / Q5_K (nmax 31) search for blocks ``x`` [nb, 256].

    Returns ``L`` [nb, 256] (levels 0..nmax), ``d``, ``dmin`` [nb] (fp16-rounded float32) and 6-bit ``ls``, ``lm`` [nb, 8].
    """
    nb = x.shape[0]
    L = np.empty((nb, QK_K), np.uint8)
    ls = np.empty((nb, 8), np.uint8)
    lm = np.empty((nb, 8), np.uint8)
    d_out = np.empty(nb, np.float32)
    dmin_out = np.empty(nb, np.float32)
    f63 = np.float32(63.0)
    G = QKX_GROUP
    for c in prange((nb + CHUNK - 1) // CHUNK):
        full = qkx2_scratch(32, 8 * G)
        last = qkx2_scratch(32, 8 * (min(nb, (c + 1) * CHUNK) - c * CHUNK) % (8 * G) or 8 * G)
        sum_x2 = np.empty(8 * G, np.float32)
        q = np.empty(32, np.float32)
        all_scales = np.empty(8 * G, np.float32)
        all_mins = np.empty(8 * G, np.float32)
        for i0 in range(c * CHUNK, min(nb, (c + 1) * CHUNK), G):
            g = min(G, min(nb, (c + 1) * CHUNK) - i0)
            scratch = full if g == G else last
            xt, wt, Lt = scratch[0], scratch[1], scratch[2]
            m = 8 * g
            for j in range(m):
                sum_x2[j] = F0
            for b in range(g):
                for k in range(32):
                    for j in range(8):
                        v = x[i0 + b, 32 * j + k]
                        xt[k, 8 * b + j] = v
                        sum_x2[8 * b + j] += v * v
            for j in range(m):
                av_x = np.float32(np.sqrt(sum_x2[j] / np.float32(32.0)))
                for k in range(32):
                    wt[k, j] = av_x + abs(xt[k, j])
            make_qkx2_quants(scratch, nmax, rmin, rdelta, nstep, False, all_scales[:m], all_mins[:m])
            for b in range(g):
                i = i0 + b
                scales = all_scales[8 * b:8 * b + 8]
                mins = all_mins[8 * b:8 * b + 8]
                max_scale = F0
                max_min = F0
                for j in range(8):
                    for k in range(32):
                        L[i, 32 * j + k] = Lt[k, 8 * b + j]
                    if scales[j] > max_scale:
                        max_scale = scales[j]
                    if mins[j] > max_min:
                        max_min = mins[j]
                inv_scale = f63 / max_scale if max_scale > F0 else F0
                inv_min = f63 / max_min if max_min > F0 else F0
                for j in range(8):
                    ls[i, j] = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)
                    lm[i, j] = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
                d = fp16_round(max_scale / f63)
                dmin = fp16_round(max_min / f63)
                d_out[i] = d
                dmin_out[i] = dmin
                for j in range(8):
                    dj = d * np.float32(ls[i, j])
                    if dj != F0:
                        requantize(x[i, 32 * j:32 * j + 32], dmin * np.float32(lm[i, j]), dj, 0, nmax, q,
                                   L[i, 32 * j:32 * j + 32])
    return L, d_out, dmin_out, ls, lm


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def q2_k_blocks(x):
    """Q2_K search for blocks ``x`` [nb, 256]: ``L`` (0..3), ``d``, ``dmin`` and the packed 4+4-bit ``scales`` [nb, 16]."""
    nb = x.shape[0]
    L = np.empty((nb, QK_K), np.uint8)
    sc = np.empty((nb, 16), np.uint8)
    d_out = np.empty(nb, np.float32)
    dmin_out = np.empty(nb, np.float32)
    q4scale = np.float32(15.0)
    rmin = np.float32(-0.5)
    for c in prange((nb + CHUNK - 1) // CHUNK):
        scratch = qkx2_scratch(16, 16)
        xt, wt, Lt = scratch[0], scratch[1], scratch[2]
        scales = np.empty(16, np.float32)
        mins = np.empty(16, np.float32)
        for i in range(c * CHUNK, min(nb, (c + 1) * CHUNK)):
            for k in range(16):
                for j in range(16):
                    v = x[i, 16 * j + k]
                    xt[k, j] = v
                    wt[k, j] = abs(v)
            make_qkx2_quants(scratch, 3, rmin, ONE_TENTH, 15, True, scales, mins)
            max_scale = F0
            max_min = F0
            for j in range(16):
                for k in range(16):
                    L[i, 16 * j + k] = Lt[k, j]
                if scales[j] > max_scale:
                    max_scale = scales[j]
                if mins[j] > max_min:
                    max_min = mins[j]
            d = F0
            dmin = F0
            if max_scale > F0:
                iscale = q4scale / max_scale
                for j in range(16):
                    sc[i, j] = nearest_int(iscale * scales[j]) & 0xFF
                d = fp16_round(max_scale / q4scale)
            else:
                for j in range(16):
                    sc[i, j] = 0
            if max_min > F0:
                iscale = q4scale / max_min
                for j in range(16):
                    sc[i, j] = (sc[i, j] | (nearest_int(iscale * mins[j]) << 4)) & 0xFF
                dmin = fp16_round(max_min / q4scale)
            d_out[i] = d
            dmin_out[i] = dmin
            for j in range(16):
                dj = d * np.float32(sc[i, j] & 0xF)
                if dj == F0:
                    continue
                dm = dmin * np.float32(sc[i, j] >> 4)
                for k in range(16):
                    L[i, 16 * j + k] = max(0, min(3, nearest_int((x[i, 16 * j + k] + dm) / dj)))
    return L, d_out, dmin_out, sc


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def q3_k_blocks(x):
    """Q3_K search for blocks ``x`` [nb, 256]: ``L`` (0..7), ``d`` and the 6-bit biased scales ``sc`` [nb, 16]."""
    nb = x.shape[0]
    L = np.empty((nb, QK_K), np.uint8)
    sc = np.empty((nb, 16), np.uint8)
    d_out = np.empty(nb, np.float32)
    for c in prange((nb + CHUNK - 1) // CHUNK):
        Ls = np.empty(16, np.int32)
        scales = np.empty(16, np.float32)
        for i in range(c * CHUNK, min(nb, (c + 1) * CHUNK)):
            max_scale = F0
            amax = F0
            for j in range(16):
                s = make_q3_quants(x[i, 16 * j:16 * j + 16], Ls, 4)
                for k in range(16):
                    L[i, 16 * j + k] = Ls[k]
                scales[j] = s
                if abs(s) > amax:
                    amax = abs(s)
                    max_scale = s
            d = F0
            if max_scale != F0:
                iscale = np.float32(-32.0) / max_scale
                for j in range(16):
                    l = ((nearest_int(iscale * scales[j]) + 128) & 0xFF) - 128  # int8_t truncation
                    sc[i, j] = max(-32, min(31, l)) + 32
                d = fp16_round(F1 / iscale)
            else:
                for j in range(16):
                    sc[i, j] = 0
            d_out[i] = d
            for j in range(16):
                dj = d * np.float32(np.int32(sc[i, j]) - 32)
                if dj == F0:
                    continue
                for k in range(16):
                    L[i, 16 * j + k] = max(-4, min(3, nearest_int(x[i, 16 * j + k] / dj))) + 4
    return L, d_out, sc


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def q6_k_blocks(x):
    """Q6_K search for blocks ``x`` [nb, 256]: ``L`` (0..63), ``d`` and the int8 scales (as uint8) ``sc`` [nb, 16]."""
    nb = x.shape[0]
    L = np.empty((nb, QK_K), np.uint8)
    sc = np.empty((nb, 16), np.uint8)
    d_out = np.empty(nb, np.float32)
    for c in prange((nb + CHUNK - 1) // CHUNK):
        Ls = np.empty(16, np.int32)
        iscales = np.empty(N_QX_CANDIDATES, np.float32)
        sumlx = np.empty(N_QX_CANDIDATES, np.float32)
        suml2 = np.empty(N_QX_CANDIDATES, np.float32)
        w = np.empty(16, np.float32)
        wx = np.empty(16, np.float32)
        scales = np.empty(16, np.float32)
        for i in range(c * CHUNK, min(nb, (c + 1) * CHUNK)):
            max_scale = F0
            max_abs_scale = F0
            for j in range(16):
                for k in range(16):
                    w[k] = x[i, 16 * j + k] * x[i, 16 * j + k]
                s = make_qx_quants(x[i, 16 * j:16 * j + 16], Ls, 32, w, wx, iscales, sumlx, suml2)
                for k in range(16):
                    L[i, 16 * j + k] = Ls[k]
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
            d = fp16_round(F1 / iscale)
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
