"""Numba kernels for llama.cpp's 3-bit grid I-quants, IQ3_S and IQ3_XXS, with and without importance weights.

Both mirror the scalar C of ``ggml/src/ggml-quants.c`` (llama.cpp as vendored in llama-cpp-python 0.3.36):
``quantize_iq3_s`` over ``quantize_row_iq3_s_impl`` (32-weight blocks) and ``quantize_iq3_xxs`` over
``quantize_row_iq3_xxs_impl``, with the tables of ``iq3xs_init_impl``. A 256-weight super-block stores one fp16 scale
and a 4-bit scale per 32-weight block; each group of 4 magnitudes is an index into a grid of points (512 for IQ3_S,
256 for IQ3_XXS) whose coordinates are the odd levels 1..15, and the signs are stored apart (IQ3_XXS: 7 sign bits per
8 weights, the 8th makes the count of negatives even, C flips the least important weight to get there).

The search of a block tries the scales ``max / (15 + 0.2 * is)`` (``is`` = -9..9 for IQ3_S, -15..15 for IQ3_XXS):
each rounds the magnitudes to levels; a group of 4 levels that is not a grid point takes the nearest of its
precomputed neighbours (``iq3_find_best_neighbour``: every grid point at one of the ``nwant`` smallest distances,
weighted distance under ``sqrt(weight)``, the first of equal ones); the weighted least-squares scale of the levels
(``weight``: ``x*x`` without an imatrix, ``qw * sqrt(sigma2 + x*x)`` with one) picks the best. When the best still
has groups off the grid, they are rounded again with that scale (IQ3_S: every group) and the scale refitted.

As in :mod:`releaser.gguf.kquants`, every float operation is float32 in C's order (sums sequential, no fused
multiply-add). Two of C's quirks are kept: IQ3_S skips an all-zero block without moving its ``qs``/``signs``
pointers, so the following blocks' grid indices and signs are written one block early (the last block's stay zero);
and ``nearest_int`` is ggml's (rounding through 1.5 * 2**23, with its wrap-around for out-of-range values).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .iqgrid import grid_tables
from .kquants import F0, F1, nearest_int

# llama.cpp's grids (iq3xs_init_impl's kgrid_256 and kgrid_512): each point's 4 levels l (0..7), 3 bits each
KGRID_256 = (
    0, 2, 4, 9, 11, 15, 16, 18, 25, 34, 59, 61, 65, 67, 72, 74,
    81, 85, 88, 90, 97, 108, 120, 128, 130, 132, 137, 144, 146, 153, 155, 159,
    169, 175, 189, 193, 199, 200, 202, 213, 248, 267, 287, 292, 303, 315, 317, 321,
    327, 346, 362, 413, 436, 456, 460, 462, 483, 497, 513, 515, 520, 522, 529, 531,
    536, 538, 540, 551, 552, 576, 578, 585, 592, 594, 641, 643, 648, 650, 657, 664,
    698, 704, 706, 720, 729, 742, 758, 769, 773, 808, 848, 852, 870, 889, 901, 978,
    992, 1024, 1026, 1033, 1035, 1040, 1042, 1046, 1049, 1058, 1089, 1091, 1093, 1096, 1098, 1105,
    1112, 1139, 1143, 1144, 1152, 1154, 1161, 1167, 1168, 1170, 1183, 1184, 1197, 1217, 1224, 1228,
    1272, 1276, 1309, 1323, 1347, 1367, 1377, 1404, 1473, 1475, 1486, 1509, 1537, 1544, 1546, 1553,
    1555, 1576, 1589, 1594, 1600, 1602, 1616, 1625, 1636, 1638, 1665, 1667, 1672, 1685, 1706, 1722,
    1737, 1755, 1816, 1831, 1850, 1856, 1862, 1874, 1901, 1932, 1950, 1971, 2011, 2032, 2052, 2063,
    2077, 2079, 2091, 2095, 2172, 2192, 2207, 2208, 2224, 2230, 2247, 2277, 2308, 2345, 2356, 2389,
    2403, 2424, 2501, 2504, 2506, 2520, 2570, 2593, 2616, 2624, 2630, 2646, 2669, 2700, 2714, 2746,
    2754, 2795, 2824, 2835, 2839, 2874, 2882, 2905, 2984, 3028, 3042, 3092, 3108, 3110, 3124, 3153,
    3185, 3215, 3252, 3288, 3294, 3364, 3397, 3434, 3483, 3523, 3537, 3587, 3589, 3591, 3592, 3610,
    3626, 3670, 3680, 3722, 3749, 3754, 3776, 3789, 3803, 3824, 3857, 3873, 3904, 3906, 3924, 3992,
)
KGRID_512 = (
    0, 1, 2, 5, 7, 8, 9, 10, 12, 14, 16, 17, 21, 27, 32, 34,
    37, 39, 41, 43, 48, 50, 57, 60, 63, 64, 65, 66, 68, 72, 73, 77,
    80, 83, 87, 89, 93, 100, 113, 117, 122, 128, 129, 133, 135, 136, 139, 142,
    145, 149, 152, 156, 162, 165, 167, 169, 171, 184, 187, 195, 201, 205, 208, 210,
    217, 219, 222, 228, 232, 234, 247, 249, 253, 256, 267, 271, 273, 276, 282, 288,
    291, 297, 312, 322, 324, 336, 338, 342, 347, 353, 357, 359, 374, 379, 390, 393,
    395, 409, 426, 441, 448, 450, 452, 464, 466, 470, 475, 488, 492, 512, 513, 514,
    516, 520, 521, 523, 525, 527, 528, 530, 537, 540, 542, 556, 558, 561, 570, 576,
    577, 579, 582, 584, 588, 593, 600, 603, 609, 616, 618, 632, 638, 640, 650, 653,
    655, 656, 660, 666, 672, 675, 685, 688, 698, 705, 708, 711, 712, 715, 721, 727,
    728, 732, 737, 754, 760, 771, 773, 778, 780, 793, 795, 802, 806, 808, 812, 833,
    840, 843, 849, 856, 858, 873, 912, 916, 919, 932, 934, 961, 963, 968, 970, 977,
    989, 993, 1010, 1016, 1024, 1025, 1027, 1029, 1031, 1032, 1034, 1036, 1038, 1041, 1043, 1047,
    1048, 1050, 1057, 1059, 1061, 1064, 1066, 1079, 1080, 1083, 1085, 1088, 1090, 1096, 1099, 1103,
    1106, 1109, 1113, 1116, 1122, 1129, 1153, 1156, 1159, 1169, 1171, 1176, 1183, 1185, 1195, 1199,
    1209, 1212, 1216, 1218, 1221, 1225, 1234, 1236, 1241, 1243, 1250, 1256, 1270, 1281, 1287, 1296,
    1299, 1306, 1309, 1313, 1338, 1341, 1348, 1353, 1362, 1375, 1376, 1387, 1400, 1408, 1410, 1415,
    1425, 1453, 1457, 1477, 1481, 1494, 1496, 1507, 1512, 1538, 1545, 1547, 1549, 1551, 1554, 1561,
    1563, 1565, 1570, 1572, 1575, 1577, 1587, 1593, 1601, 1603, 1605, 1612, 1617, 1619, 1632, 1648,
    1658, 1662, 1664, 1674, 1680, 1690, 1692, 1704, 1729, 1736, 1740, 1745, 1747, 1751, 1752, 1761,
    1763, 1767, 1773, 1787, 1795, 1801, 1806, 1810, 1817, 1834, 1840, 1844, 1857, 1864, 1866, 1877,
    1882, 1892, 1902, 1915, 1934, 1953, 1985, 1987, 2000, 2002, 2013, 2048, 2052, 2058, 2064, 2068,
    2071, 2074, 2081, 2088, 2104, 2114, 2119, 2121, 2123, 2130, 2136, 2141, 2147, 2153, 2157, 2177,
    2179, 2184, 2189, 2193, 2203, 2208, 2223, 2226, 2232, 2244, 2249, 2251, 2256, 2258, 2265, 2269,
    2304, 2306, 2324, 2335, 2336, 2361, 2373, 2375, 2385, 2418, 2443, 2460, 2480, 2504, 2509, 2520,
    2531, 2537, 2562, 2568, 2572, 2578, 2592, 2596, 2599, 2602, 2614, 2620, 2625, 2627, 2629, 2634,
    2641, 2650, 2682, 2688, 2697, 2707, 2712, 2718, 2731, 2754, 2759, 2760, 2775, 2788, 2793, 2805,
    2811, 2817, 2820, 2832, 2842, 2854, 2890, 2902, 2921, 2923, 2978, 3010, 3012, 3026, 3081, 3083,
    3085, 3097, 3099, 3120, 3136, 3152, 3159, 3188, 3210, 3228, 3234, 3245, 3250, 3256, 3264, 3276,
    3281, 3296, 3349, 3363, 3378, 3392, 3395, 3420, 3440, 3461, 3488, 3529, 3531, 3584, 3588, 3591,
    3600, 3602, 3614, 3616, 3628, 3634, 3650, 3657, 3668, 3683, 3685, 3713, 3716, 3720, 3726, 3729,
    3736, 3753, 3778, 3802, 3805, 3819, 3841, 3845, 3851, 3856, 3880, 3922, 3938, 3970, 3993, 4032,
)

F2 = np.float32(2.0)
F05 = np.float32(0.5)
F15 = np.float32(15.0)
F31 = np.float32(31.0)
F256 = np.float32(256.0)
ONE_FIFTH = np.float32(0.2)
FLT_MAX = np.float32(3.4028234663852886e38)
GROUP_MAX_EPS_IQ3_XXS = np.float32(1e-8)
IQ3S_FUDGE = np.float32(1.033)
IQ3XXS_FUDGE = np.float32(1.0125)


GRID_S, KMAP_S, NEIGHBOURS_S = grid_tables(KGRID_512, 3)
GRID_XXS, KMAP_XXS, NEIGHBOURS_XXS = grid_tables(KGRID_256, 2)


@njit(cache=True, error_model="numpy", inline="always")
def _best_neighbour(neighbours, start, grid, xval, waux, o, scale, L):
    """``iq3_find_best_neighbour`` for the group ``xval[o:o + 4]``: the listed grid point nearest to ``xval / scale``
    under the weights ``waux`` (the first of equal distances); its levels go to ``L[o:o + 4]``."""
    best_d2 = FLT_MAX
    gi = 0
    for j in range(1, int(neighbours[start]) + 1):
        g = int(neighbours[start + j])
        d2 = F0
        for i in range(4):
            diff = scale * np.float32(grid[g, i]) - xval[o + i]
            d2 += waux[o + i] * diff * diff
        if d2 < best_d2:
            best_d2 = d2
            gi = g
    for i in range(4):
        L[o + i] = (grid[gi, i] - 1) // 2
    return gi


@njit(cache=True, error_model="numpy", inline="always")
def _group_levels(id_, xval, o, L):
    """Levels ``clamp(nearest_int(0.5 * (id * x - 1)), 0, 7)`` of one group into ``L[o:o + 4]``; returns its key."""
    u = 0
    for i in range(4):
        l = max(0, min(7, nearest_int(F05 * (id_ * xval[o + i] - F1))))
        L[o + i] = l
        u |= l << (3 * i)
    return u


@njit(cache=True, error_model="numpy", inline="always")
def _fit(xval, weight, L, sumqx_sumq2):
    sumqx = F0
    sumq2 = F0
    for i in range(32):
        w = weight[i]
        q = np.float32(2 * L[i] + 1)
        sumqx += w * xval[i] * q
        sumq2 += w * q * q
    sumqx_sumq2[0] = sumqx
    sumqx_sumq2[1] = sumq2


@njit(cache=True, error_model="numpy", inline="always")
def _block_search(xval, weight, waux, mx, L, Laux, on_grid, on_grid_aux, sums, grid, kmap, neighbours, nis,
                  repick_all):
    """The scale search of one 32-weight block (magnitudes ``xval``, largest ``mx`` > 0): the levels go to ``L``,
    returns the scale. IQ3_S: ``nis`` 9, every group re-picked; IQ3_XXS: 15, only the groups off the grid."""
    best = F0
    scale = mx / F15
    for k in range(8):
        on_grid[k] = not repick_all   # IQ3_S starts from "off the grid", IQ3_XXS from "on"
        for i in range(4):
            L[4 * k + i] = 0
    for is_ in range(-nis, nis + 1):
        id_ = (F15 + np.float32(is_) * ONE_FIFTH) / mx
        this_scale = F1 / id_
        for k in range(8):
            u = _group_levels(id_, xval, 4 * k, Laux)
            on_grid_aux[k] = kmap[u] >= 0
            if kmap[u] < 0:
                _best_neighbour(neighbours, -kmap[u] - 1, grid, xval, waux, 4 * k, this_scale, Laux)
        _fit(xval, weight, Laux, sums)
        sumqx, sumq2 = sums[0], sums[1]
        if sumq2 > F0 and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            for i in range(32):
                L[i] = Laux[i]
            for k in range(8):
                on_grid[k] = on_grid_aux[k]
    n_not_on_grid = 0
    for k in range(8):
        n_not_on_grid += not on_grid[k]
    if n_not_on_grid > 0 and scale > F0:
        id_ = F1 / scale
        for k in range(8):
            if on_grid[k] and not repick_all:
                continue
            u = _group_levels(id_, xval, 4 * k, L)
            gi = kmap[u]
            if gi < 0:
                gi = _best_neighbour(neighbours, -gi - 1, grid, xval, waux, 4 * k, scale, L)
            for i in range(4):
                L[4 * k + i] = (grid[gi, i] - 1) // 2
        _fit(xval, weight, L, sums)
        if sums[1] > F0:
            scale = sums[0] / sums[1]
    return scale


@njit(cache=True, error_model="numpy", inline="always")
def _block_weights(xb, qw, sigma2, weighted, weight, waux):
    for i in range(32):
        weight[i] = qw[i] * np.float32(np.sqrt(sigma2 + xb[i] * xb[i])) if weighted else xb[i] * xb[i]
        waux[i] = np.float32(np.sqrt(weight[i]))


@njit(cache=True, error_model="numpy", inline="always")
def _sigma2(xs):
    s = F0
    for i in range(256):
        s += xs[i] * xs[i]
    return F2 * s / F256


@njit(cache=True, error_model="numpy")
def _scratch():
    """xval, weight, waux (32 float32), L, Laux (32 int32), on_grid, on_grid_aux (8 bool), the two sums, the eight
    block scales, the block's signs (4 ints)."""
    return (np.empty(32, np.float32), np.empty(32, np.float32), np.empty(32, np.float32), np.empty(32, np.int32),
            np.empty(32, np.int32), np.empty(8, np.bool_), np.empty(8, np.bool_), np.empty(2, np.float32),
            np.empty(8, np.float32), np.empty(4, np.int32))


@njit(cache=True, error_model="numpy", inline="always")
def _key(L, o):
    return L[o] | (L[o + 1] << 3) | (L[o + 2] << 6) | (L[o + 3] << 9)


@njit(cache=True, error_model="numpy", inline="always")
def group_magnitudes(xb, weight, xval, bsigns, k, even):
    """The magnitudes of the group ``k`` of 8 weights into ``xval`` and its sign mask into ``bsigns[k]`` (IQ3 and
    IQ2). ``even`` (IQ3_XXS, IQ2_XXS, IQ2_XS) stores 7 sign bits: an odd count of negatives flips the weight of least
    ``weight * x * x`` (the first of equal ones), whose magnitude then enters negated."""
    nflip = 0
    s = 0
    for i in range(8):
        v = xb[8 * k + i]
        if v >= F0:
            xval[8 * k + i] = v
        else:
            xval[8 * k + i] = -v
            nflip += 1
            s |= 1 << i
    if even and nflip % 2:
        imin = 0
        mn = weight[8 * k] * xb[8 * k] * xb[8 * k]
        for i in range(1, 8):
            ax = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i]
            if ax < mn:
                mn = ax
                imin = i
        xval[8 * k + imin] = -xval[8 * k + imin]
        s ^= 1 << imin
    bsigns[k] = s & 127 if even else s


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def iq3_rows(x, qw, widx, weighted, xxs):
    """IQ3_S (``xxs`` False) or IQ3_XXS for rows ``x`` [R, C] (C a multiple of 256); ``qw`` [n, C] and ``widx`` [R]:
    the weight row of each row (read only when ``weighted``). Returns per super-block: the scale ``d`` [nb] (float32,
    before fp16 rounding), the grid index of each group of 4 ``gi`` [nb, 8, 8] and the sign masks ``signs``
    [nb, 8, 4] of each 32-weight block, the 4-bit block scales ``ls`` [nb, 8], and which blocks were searched
    ``searched`` [nb, 8] (IQ3_S's all-zero blocks are not: C writes the next blocks in their place). IQ3_XXS: a
    super-block whose scales are all 0 is all zeros, as C's memset makes it."""
    grid, kmap, neighbours = (GRID_XXS, KMAP_XXS, NEIGHBOURS_XXS) if xxs else (GRID_S, KMAP_S, NEIGHBOURS_S)
    nis = 15 if xxs else 9
    R, C = x.shape
    nper = C // 256
    nb = R * nper
    d_out = np.zeros(nb, np.float32)
    gi = np.zeros((nb, 8, 8), np.uint16)
    signs = np.zeros((nb, 8, 4), np.uint8)
    ls = np.zeros((nb, 8), np.uint8)
    searched = np.zeros((nb, 8), np.bool_)
    chunk = 16
    for ch in prange((nb + chunk - 1) // chunk):
        xval, weight, waux, L, Laux, on_grid, on_grid_aux, sums, scales, bsigns = _scratch()
        for b in range(ch * chunk, min(nb, (ch + 1) * chunk)):
            r = b // nper
            off = (b - r * nper) * 256
            xs = x[r, off:off + 256]
            sigma2 = _sigma2(xs) if weighted else F0
            max_scale = F0
            for ib in range(8):
                xb = xs[32 * ib:32 * ib + 32]
                _block_weights(xb, qw[widx[r], off + 32 * ib:off + 32 * ib + 32], sigma2, weighted, weight, waux)
                for k in range(4):
                    group_magnitudes(xb, weight, xval, bsigns, k, xxs)
                mx = xval[0]
                for i in range(1, 32):
                    mx = mx if mx > xval[i] else xval[i]
                scales[ib] = F0
                if (mx < GROUP_MAX_EPS_IQ3_XXS) if xxs else (mx == F0):   # IQ3_S: C's `if (!max)`
                    continue
                scale = _block_search(xval, weight, waux, mx, L, Laux, on_grid, on_grid_aux, sums, grid, kmap,
                                      neighbours, nis, not xxs)
                if scale < F0:
                    scale = -scale
                    for k in range(4):
                        bsigns[k] = ~bsigns[k] & (127 if xxs else 255)
                for k in range(8):
                    gi[b, ib, k] = kmap[_key(L, 4 * k)]
                for k in range(4):
                    signs[b, ib, k] = bsigns[k]
                searched[b, ib] = True
                scales[ib] = scale
                max_scale = max_scale if max_scale > scale else scale
            if max_scale == F0:
                if xxs:
                    gi[b] = 0
                    signs[b] = 0
                continue
            d = max_scale / F31
            d_out[b] = d * (IQ3XXS_FUDGE if xxs else IQ3S_FUDGE)
            id_ = F1 / d
            for ib in range(8):
                ls[b, ib] = max(0, min(15, nearest_int(F05 * (id_ * scales[ib] - F1))))
    return d_out, gi, signs, ls, searched


KERNELS = (iq3_rows,)
