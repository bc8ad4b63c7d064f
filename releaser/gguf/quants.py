"""GGUF tensor quantization with the exact bytes llama.cpp's ``llama-quantize`` writes, with or without an imatrix.

``quantize(data, qtype, weights=None)`` takes float32 data of shape ``[..., n_per_row]`` and returns uint8 data of shape
``[..., bytes_per_row]`` (the layout ``gguf.quants.quantize`` uses and ``GGUFWriter.add_tensor(raw_dtype=...)`` takes).

* F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 delegate to gguf-py's ``gguf.quants`` (the tests check them against
  llama.cpp). gguf-py differs from ggml's C in one corner, the sign of a zero in the block header: C keeps the first of
  equal values (+0.0 vs -0.0) for Q4_1/Q5_1's min and max and writes d = -0.0 for an all-zero Q4_0/Q5_0 block;
  :class:`LegacyQuant` rewrites those header fields the C way.
* Q2_K, Q3_K, Q4_K, Q5_K, Q6_K are our own port of llama.cpp's ``quantize_row_q*_K_ref``: the per-block search runs in
  numba (:mod:`releaser.gguf.kquants`, parallel over blocks on all cores), the bit packing below is vectorised numpy,
  one small class per type as in gguf-py (``search`` then ``pack``). Calls are thread-safe (K-quant kernels run one
  at a time; each uses all cores).
* With importance ``weights`` (an imatrix entry), the K-quants and Q4_0/Q4_1/Q5_0/Q5_1 take llama.cpp's weighted
  search instead (:mod:`releaser.gguf.kquants_imatrix`: its classes subclass these and reuse their packing); Q8_0 and
  the float types ignore the weights, as llama.cpp does.
* IQ4_NL and IQ4_XS (4-bit indices into llama.cpp's non-linear ``kvalues_iq4nl``) are our port of
  ``quantize_iq4_nl`` / ``quantize_iq4_xs``, with or without weights: one numba kernel each
  (:mod:`releaser.gguf.iquants`), then the packing of :class:`IQuant`'s classes. IQ3_S and IQ3_XXS (indices into
  grids of 4 magnitudes, signs apart) are our port of ``quantize_iq3_s`` / ``quantize_iq3_xxs``
  (:mod:`releaser.gguf.iquants3`). IQ2_XXS, IQ2_XS and IQ2_S (indices into grids of 8 magnitudes) are our port of
  ``quantize_iq2_xxs`` / ``quantize_iq2_xs`` / ``quantize_iq2_s`` (:mod:`releaser.gguf.iquants2`); IQ2_XXS and
  IQ2_XS exist only with importance weights (llama.cpp asserts them).
  IQ1_S and IQ1_M (indices into a grid of 8 weights of -1/0/+1, shifted by
  +-1/8) are our port of ``quantize_iq1_s`` / ``quantize_iq1_m`` (:mod:`releaser.gguf.iquants1`); IQ1_S exists
  only with importance weights.

``dequantize(raw, qtype)`` delegates to ``gguf.quants.dequantize`` for every type.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from threading import Lock

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from releaser.errors import ConfigError, ModelError
from releaser.gguf import iquants, iquants1, iquants3, kquants
from releaser.gguf.mixes import WEIGHTS_REQUIRED

QT = GGMLQuantizationType
QK_K = kquants.QK_K

#: Types quantized by gguf-py (the legacy block types with the header fix of LegacyQuant).
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
GGUF_PY_TYPES = (*FLOAT_TYPES, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1)


# numba's workqueue threading layer aborts when two Python threads enter parallel kernels at once
_KERNEL_LOCK = Lock()


class QuantizeError(ModelError):
    """A tensor cannot be quantized to the requested type (row length, dtype)."""


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    """[nb] float32 (already fp16-representable) -> [nb, 2] little-endian IEEE half bytes."""
    return values.astype("<f2").view(np.uint8).reshape(-1, 2)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """[nb, 256] levels 0..3 -> [nb, 64]: byte 32h+l holds L[128h+32k+l] << 2k for k = 0..3."""
    L = L.reshape(-1, 2, 4, 32)
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    return np.bitwise_or.reduce(L << shifts, axis=2).reshape(-1, 64)


def _pack_nibbles(L: np.ndarray) -> np.ndarray:
    """[nb, 256] low nibbles -> [nb, 128]: byte 32c+l holds L[64c+l] | L[64c+32+l] << 4."""
    L = (L & 0xF).reshape(-1, 4, 2, 32)
    return (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins [nb, 8] -> the 12 ``scales`` bytes of Q4_K/Q5_K (inverse of get_scale_min_k4)."""
    lo, hi = slice(0, 4), slice(4, 8)
    return np.concatenate(
        [
            ls[:, lo] | ((ls[:, hi] >> 4) << 6),
            lm[:, lo] | ((lm[:, hi] >> 4) << 6),
            (ls[:, hi] & 0xF) | ((lm[:, hi] & 0xF) << 4),
        ],
        axis=1,
    )


class LegacyQuant:
    """gguf-py's quantizer for a 32-weight legacy type, with the fp16 header patched to C's signed-zero semantics."""

    qtype: GGMLQuantizationType
    nmax = 0  # Q4_1/Q5_1: d = (max - min) / nmax; 0 for the symmetric Q4_0/Q5_0

    @classmethod
    def quantize_rows(cls, data: np.ndarray) -> np.ndarray:
        """Contiguous float32 [..., n_per_row] -> [..., bytes_per_row]: gguf-py on whole rows (it works 16 rows at a
        time, so rows, not 32-weight blocks, keep it fast), then only the headers that can differ are rewritten."""
        out = np.asarray(gguf_quants.quantize(data, cls.qtype))
        blocks, headers = data.reshape(-1, 32), out.reshape(-1, type_size(cls.qtype))
        if cls.nmax:  # only a zero min (±0.0, or an all-zero block's d) can differ; C's strict < and > keep the first
            idx = np.flatnonzero(blocks.min(axis=1) == 0)  # of equal values (0.0 == -0.0), as argmin/argmax do
            sub = blocks[idx]
            mn = np.take_along_axis(sub, sub.argmin(axis=1)[:, None], axis=1)
            mx = np.take_along_axis(sub, sub.argmax(axis=1)[:, None], axis=1)
            headers[idx, 0:2] = _f16_bytes((mx - mn) / np.float32(cls.nmax))
            headers[idx, 2:4] = _f16_bytes(mn)
        else:  # C's max stays at its initial +0.0 in an all-zero block, so d = 0.0 / -8 = -0.0
            headers[np.abs(blocks).max(axis=1) == 0, 0:2] = _f16_bytes(np.array([-0.0], np.float32))
        return out


class Q4_0(LegacyQuant):
    qtype = QT.Q4_0


class Q5_0(LegacyQuant):
    qtype = QT.Q5_0


class Q4_1(LegacyQuant):
    qtype, nmax = QT.Q4_1, 15


class Q5_1(LegacyQuant):
    qtype, nmax = QT.Q5_1, 31


class KQuant(ABC):
    """A K-quant type: ``quantize_blocks`` maps float32 super-blocks [nb, 256] to their bytes [nb, type_size]: the
    kernel's search, then ``pack`` of what it returns (the imatrix-weighted search of
    :mod:`releaser.gguf.kquants_imatrix` returns the same arrays and shares ``pack``)."""

    qtype: GGMLQuantizationType

    @classmethod
    @abstractmethod
    def search(cls, blocks: np.ndarray) -> tuple: ...

    @classmethod
    @abstractmethod
    def pack(cls, *levels) -> np.ndarray: ...

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return cls.pack(*cls.search(blocks))


class Q2_K(KQuant):
    qtype = QT.Q2_K

    search = staticmethod(kquants.q2_k_blocks)

    @classmethod
    def pack(cls, L, d, dmin, scales) -> np.ndarray:
        return np.concatenate([scales, _pack_2bit(L), _f16_bytes(d), _f16_bytes(dmin)], axis=1)


class Q3_K(KQuant):
    qtype = QT.Q3_K

    search = staticmethod(kquants.q3_k_blocks)

    @classmethod
    def pack(cls, L, d, sc) -> np.ndarray:
        high = (L > 3).reshape(-1, 8, 32)  # bit k of hmask[m] is the high bit of L[32k+m]
        hmask = np.bitwise_or.reduce(high.astype(np.uint8) << np.arange(8, dtype=np.uint8).reshape(1, 8, 1), axis=1)
        packed = np.empty((sc.shape[0], 12), np.uint8)
        packed[:, :8] = (sc[:, :8] & 0xF) | ((sc[:, 8:] & 0xF) << 4)
        top = ((sc >> 4) & 3).reshape(-1, 4, 4)  # [nb, group g = j // 4, t = j % 4]
        packed[:, 8:] = np.bitwise_or.reduce(top << np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1), axis=1)
        return np.concatenate([hmask, _pack_2bit(L & 3), packed, _f16_bytes(d)], axis=1)


class Q4_K(KQuant):
    qtype = QT.Q4_K
    nmax, rmin, rdelta, nstep = 15, np.float32(-1.0), np.float32(0.1), 20

    @classmethod
    def search(cls, blocks: np.ndarray) -> tuple:
        return kquants.qkx_blocks(blocks, cls.nmax, cls.rmin, cls.rdelta, cls.nstep)

    @classmethod
    def pack(cls, L, d, dmin, ls, lm) -> np.ndarray:
        return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scale_min_k4(ls, lm), _pack_nibbles(L)], axis=1)


class Q5_K(Q4_K):
    qtype = QT.Q5_K
    nmax, rmin, rdelta, nstep = 31, np.float32(-0.5), np.float32(0.1), 15

    @classmethod
    def pack(cls, L, d, dmin, ls, lm) -> np.ndarray:
        high = (L >> 4).reshape(-1, 8, 32)  # bit k of qh[l] is the high bit of L[32k+l]
        qh = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8).reshape(1, 8, 1), axis=1)
        parts = [_f16_bytes(d), _f16_bytes(dmin), _pack_scale_min_k4(ls, lm), qh, _pack_nibbles(L)]
        return np.concatenate(parts, axis=1)


class Q6_K(KQuant):
    qtype = QT.Q6_K

    search = staticmethod(kquants.q6_k_blocks)

    @classmethod
    def pack(cls, L, d, sc) -> np.ndarray:
        L = L.reshape(-1, 2, 4, 32)  # [nb, half h, k, l] = L[128h + 32k + l]
        lo = L & 0xF
        ql = np.stack([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2).reshape(-1, 128)
        qh = np.bitwise_or.reduce((L >> 4) << np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1), axis=2)
        return np.concatenate([ql, qh.reshape(-1, 64), sc, _f16_bytes(d)], axis=1)


class IQuant(ABC):
    """An I-quant type: ``quantize_rows`` maps float32 rows [R, C] to their bytes [R, C / block * type_size]: the
    numba kernel's search (:mod:`releaser.gguf.iquants`; with importance weights ``qw`` [n, C] and the weight row of
    each data row ``widx``, or without: ``qw`` None), then ``pack`` of what it returns."""

    qtype: GGMLQuantizationType

    @staticmethod
    @abstractmethod
    def search(rows, qw, widx, weighted) -> tuple: ...

    @classmethod
    @abstractmethod
    def pack(cls, *levels) -> np.ndarray: ...

    @classmethod
    def quantize_rows(cls, rows: np.ndarray, qw: np.ndarray | None = None, widx: np.ndarray | None = None
                      ) -> np.ndarray:
        weighted = qw is not None
        if not weighted:   # one numba signature: a dummy weight row, never read
            qw, widx = np.zeros((1, rows.shape[1]), np.float32), np.zeros(rows.shape[0], np.int64)
        with _KERNEL_LOCK:
            found = cls.search(rows, qw, widx, weighted)
        return cls.pack(*found).reshape(rows.shape[0], -1)


def _pack_iq4_levels(L: np.ndarray) -> np.ndarray:
    """[nb, 32k] level indices 0..15 -> [nb, 16k]: byte 16i+j holds L[32i+j] | L[32i+16+j] << 4."""
    L = L.reshape(L.shape[0], -1, 2, 16)
    return (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(L.shape[0], -1)


class IQ4_NL(IQuant):
    """32-weight blocks: the fp16 scale, then 16 bytes of 4-bit indices into kvalues_iq4nl."""

    qtype = QT.IQ4_NL
    search = staticmethod(iquants.iq4_nl_rows)

    @classmethod
    def pack(cls, L, d) -> np.ndarray:
        return np.concatenate([_f16_bytes(d), _pack_iq4_levels(L)], axis=1)


class IQ4_XS(IQuant):
    """256-weight super-blocks: the fp16 scale, the high 2 bits of the eight 6-bit block scales (uint16), their low 4
    bits (4 bytes), then 128 bytes of 4-bit indices into kvalues_iq4nl."""

    qtype = QT.IQ4_XS
    search = staticmethod(iquants.iq4_xs_rows)

    @classmethod
    def pack(cls, L, d, ls) -> np.ndarray:
        high = (ls >> 4).astype(np.uint16) << (2 * np.arange(8, dtype=np.uint16))
        scales_h = np.bitwise_or.reduce(high, axis=1).astype("<u2").view(np.uint8).reshape(-1, 2)
        scales_l = (ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)
        return np.concatenate([_f16_bytes(d), scales_h, scales_l, _pack_iq4_levels(L)], axis=1)


class _IQ3(IQuant):
    """IQ3_S and IQ3_XXS: one kernel (:func:`releaser.gguf.iquants3.iq3_rows`), ``xxs`` picks the type."""

    xxs = False

    @classmethod
    def search(cls, rows, qw, widx, weighted) -> tuple:
        return iquants3.iq3_rows(rows, qw, widx, weighted, cls.xxs)


class IQ3_S(_IQ3):
    """256-weight super-blocks: the fp16 scale, the low 8 bits of 64 indices into the 512-point grid (4 magnitudes
    each), their 9th bits (8 bytes), 32 bytes of signs, then the eight 4-bit block scales (4 bytes). C skips an
    all-zero 32-weight block without moving its ``qs`` and ``signs`` pointers: the next blocks' indices and signs are
    written in its place (its 9th bits are not: ``qh`` is indexed by block)."""

    qtype = QT.IQ3_S

    @classmethod
    def pack(cls, d, gi, signs, ls, searched) -> np.ndarray:
        order = np.argsort(~searched, axis=1, kind="stable")   # the searched blocks first, in order
        kept = np.take_along_axis(searched, order, axis=1)[:, :, None]
        qs = np.where(kept, np.take_along_axis(gi, order[:, :, None], axis=1), 0).astype(np.uint8)   # low 8 bits
        sg = np.where(kept, np.take_along_axis(signs, order[:, :, None], axis=1), 0)
        qh = np.bitwise_or.reduce((gi >> 8).astype(np.uint8) << np.arange(8, dtype=np.uint8), axis=2)
        scales = ls[:, 0::2] | (ls[:, 1::2] << 4)
        return np.concatenate([_f16_bytes(d), qs.reshape(-1, 64), qh, sg.reshape(-1, 32), scales], axis=1)


class IQ3_XXS(_IQ3):
    """256-weight super-blocks: the fp16 scale, 64 indices into the 256-point grid, then per 32-weight block a uint32
    of four 7-bit sign groups and the 4-bit block scale in its top bits."""

    qtype, xxs = QT.IQ3_XXS, True

    @classmethod
    def pack(cls, d, gi, signs, ls, searched) -> np.ndarray:
        s = signs.astype(np.uint32)
        words = s[:, :, 0] | (s[:, :, 1] << 7) | (s[:, :, 2] << 14) | (s[:, :, 3] << 21) | (ls.astype(np.uint32) << 28)
        return np.concatenate([_f16_bytes(d), gi.astype(np.uint8).reshape(-1, 64),
                               words.astype("<u4").view(np.uint8)], axis=1)


class _IQ2(IQuant):
    """IQ2_XXS, IQ2_XS and IQ2_S: one kernel (:func:`releaser.gguf.iquants2.iq2_rows`), ``kind`` picks the type
    (0, 1, 2: iquants2.XXS, XS, S; imported on use: iquants2 shares make_qp_quants with kquants_imatrix, which
    imports this module)."""

    kind = 0

    @classmethod
    def search(cls, rows, qw, widx, weighted) -> tuple:
        from releaser.gguf import iquants2

        return iquants2.iq2_rows(rows, qw, widx, weighted, cls.kind)


class IQ2_XXS(_IQ2):
    """256-weight super-blocks: the fp16 scale, then per 32-weight block two uint32: the 8-bit indices of its four
    groups of 8 into the 256-point grid, and its four 7-bit sign groups with the 4-bit block scale in the top bits."""

    qtype, kind = QT.IQ2_XXS, 0

    @classmethod
    def pack(cls, d, gi, signs, ls) -> np.ndarray:
        s = signs.reshape(-1, 8, 4).astype(np.uint32)
        words = s[:, :, 0] | (s[:, :, 1] << 7) | (s[:, :, 2] << 14) | (s[:, :, 3] << 21) | (
            ls[:, :8].astype(np.uint32) << 28)
        q2 = np.stack([gi.astype(np.uint8).reshape(-1, 8, 4).view("<u4")[:, :, 0], words], axis=2)
        return np.concatenate([_f16_bytes(d), q2.astype("<u4").view(np.uint8).reshape(-1, 64)], axis=1)


class IQ2_XS(_IQ2):
    """256-weight super-blocks: the fp16 scale, a uint16 per group of 8 (its 9-bit index into the 512-point grid and
    its 7 sign bits above), then the sixteen 4-bit block scales (8 bytes)."""

    qtype, kind = QT.IQ2_XS, 1

    @classmethod
    def pack(cls, d, gi, signs, ls) -> np.ndarray:
        q2 = (gi | (signs.astype(np.uint16) << 9)).astype("<u2").view(np.uint8)
        return np.concatenate([_f16_bytes(d), q2, ls[:, 0::2] | (ls[:, 1::2] << 4)], axis=1)


class IQ2_S(_IQ2):
    """256-weight super-blocks: the fp16 scale, the low 8 bits of the 32 indices into the 1024-point grid, the 8 sign
    bits of each group (32 bytes), the indices' top 2 bits (8 bytes), then the sixteen 4-bit block scales (8 bytes)."""

    qtype, kind = QT.IQ2_S, 2

    @classmethod
    def pack(cls, d, gi, signs, ls) -> np.ndarray:
        qh = np.bitwise_or.reduce((gi >> 8).astype(np.uint8).reshape(-1, 8, 4) << (2 * np.arange(4, dtype=np.uint8)),
                                  axis=2)
        return np.concatenate([_f16_bytes(d), gi.astype(np.uint8), signs, qh, ls[:, 0::2] | (ls[:, 1::2] << 4)],
                              axis=1)


class IQ1_S(IQuant):
    """256-weight super-blocks: the fp16 scale, the low 8 bits of 32 indices into the 2048-point 1-bit grid (8 weights
    each), then per 32-weight block a uint16: the 3 high bits of its 4 indices, its 3-bit scale (bits 12-14) and the
    sign of its delta (bit 15). Needs importance weights (C asserts them)."""

    qtype = QT.IQ1_S

    @staticmethod
    def search(rows, qw, widx, weighted) -> tuple:   # weighted: quantize refuses IQ1_S without (WEIGHTS_REQUIRED)
        return iquants1.iq1_s_rows(rows, qw, widx, *iquants1.tables())

    @classmethod
    def pack(cls, d, qs, qh) -> np.ndarray:
        return np.concatenate([_f16_bytes(d), qs, qh.astype("<u2").view(np.uint8)], axis=1)


class IQ1_M(IQuant):
    """256-weight super-blocks without a header: the low 8 bits of 32 indices into the 2048-point 1-bit grid, per
    16-weight block a byte with the 3 high bits of its 2 indices and the signs of their deltas, then four uint16 with
    the sixteen 3-bit block scales and, in their top nibbles, the fp16 super-block scale."""

    qtype = QT.IQ1_M

    @staticmethod
    def search(rows, qw, widx, weighted) -> tuple:
        return iquants1.iq1_m_rows(rows, qw, widx, weighted, *iquants1.tables())

    @classmethod
    def pack(cls, qs, qh, sc, d) -> np.ndarray:
        u = d.astype("<f2").view(np.uint16)
        sc = sc | ((u[:, None] >> np.array([0, 4, 8, 12], np.uint16)) & 0xF) << 12
        return np.concatenate([qs, qh, sc.astype("<u2").view(np.uint8)], axis=1)


K_QUANTS: dict[GGMLQuantizationType, type[KQuant]] = {c.qtype: c for c in (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)}
LEGACY_FIXED: dict[GGMLQuantizationType, type[LegacyQuant]] = {c.qtype: c for c in (Q4_0, Q4_1, Q5_0, Q5_1)}
I_QUANTS: dict[GGMLQuantizationType, type[IQuant]] = {c.qtype: c for c in (IQ4_NL, IQ4_XS, IQ3_S, IQ3_XXS, IQ2_XXS,
                                                                             IQ2_XS, IQ2_S, IQ1_S, IQ1_M)}
SUPPORTED_TYPES = (*GGUF_PY_TYPES, *K_QUANTS, *I_QUANTS)
#: Types whose llama.cpp quantizer takes importance weights (an imatrix); the others ignore them (Q8_0, floats).
WEIGHTED_TYPES = (*K_QUANTS, *LEGACY_FIXED, *I_QUANTS)


def _check_type(qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    try:
        checked = QT(qtype)
    except ValueError:
        checked = None
    if checked not in SUPPORTED_TYPES:
        shown = checked.name if checked is not None else repr(qtype)
        names = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise ConfigError(f"cannot quantize to {shown}: supported tensor types are {names}")
    return checked


def block_size(qtype: GGMLQuantizationType) -> int:
    """Weights per block (256 for K-quants, 32 for the legacy types, 1 for float types)."""
    return GGML_QUANT_SIZES[QT(qtype)][0]


def type_size(qtype: GGMLQuantizationType) -> int:
    """Bytes per block."""
    return GGML_QUANT_SIZES[QT(qtype)][1]


def bits_per_weight(qtype: GGMLQuantizationType) -> float:
    """Storage bits per weight, e.g. 4.5 for Q4_K, 6.5625 for Q6_K, 8.5 for Q8_0."""
    return type_size(qtype) * 8 / block_size(qtype)


def can_quantize(n_per_row: int, qtype: GGMLQuantizationType) -> bool:
    """Whether rows of this length can be stored in ``qtype`` (the length must be a multiple of the block size)."""
    return n_per_row % block_size(qtype) == 0


def _weight_rows(data: np.ndarray, weights, qtype: GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray]:
    """``weights`` ([n_per_row], or one row per matrix: data.shape[:-2] + [n_per_row]) -> the distinct weight rows
    [n, n_per_row] and the weight row of every data row."""
    weights = np.asarray(weights, dtype=np.float32)
    matrices = data.shape[:-2]
    if weights.shape not in ((data.shape[-1],), (*matrices, data.shape[-1])):
        raise QuantizeError(f"cannot quantize a tensor of shape {data.shape} to {qtype.name} with importance weights of "
                            f"shape {weights.shape}: give one weight per column ({data.shape[-1]}), per matrix")
    if not np.isfinite(weights).all():
        raise QuantizeError(f"cannot quantize to {qtype.name}: the importance weights contain NaN or infinite values")
    rows_per_matrix = data.shape[-2] if data.ndim > 1 else 1
    qw = np.array(weights.reshape(-1, data.shape[-1]), order="C")   # a writable copy: one numba signature
    widx = np.arange(data.size // data.shape[-1], dtype=np.int64) // rows_per_matrix
    return qw, (widx if qw.shape[0] > 1 else np.zeros_like(widx))


def quantize(data: np.ndarray, qtype: GGMLQuantizationType, weights: np.ndarray | None = None) -> np.ndarray:
    """Quantize float data [..., n_per_row] to llama.cpp's bytes for ``qtype``: uint8 [..., bytes_per_row].

    F32 and F16 return float32/float16 arrays (as gguf-py does); every other type returns uint8. Quantized types
    refuse NaN/Inf input (llama.cpp's validation rejects the result too).

    ``weights``: importance weights (an imatrix entry: the mean squared input of each column), float [n_per_row] for
    all rows or data.shape[:-2] + [n_per_row] (one row per matrix, e.g. per expert). The types of
    ``WEIGHTED_TYPES`` are then quantized as llama.cpp does with ``quant_weights``
    (:mod:`releaser.gguf.kquants_imatrix`); the other types ignore them, as llama.cpp does.
    """
    qtype = _check_type(qtype)
    data = np.asarray(data)
    if data.ndim == 0 or data.shape[-1] == 0:
        raise QuantizeError(f"cannot quantize a tensor of shape {data.shape} to {qtype.name}: it has no rows")
    if not can_quantize(data.shape[-1], qtype):
        raise QuantizeError(
            f"cannot quantize rows of {data.shape[-1]} values to {qtype.name}: the row length must be a multiple of "
            f"{block_size(qtype)} (use a fallback type such as Q5_0/Q8_0/F16 for this tensor)"
        )
    data = data.astype(np.float32, copy=False)
    if qtype in FLOAT_TYPES:
        return gguf_quants.quantize(data, qtype)
    if not np.isfinite(data).all():
        raise QuantizeError(f"cannot quantize to {qtype.name}: the tensor contains NaN or infinite values")
    if weights is None and qtype in WEIGHTS_REQUIRED:
        raise QuantizeError(f"cannot quantize to {qtype.name} without importance weights (an imatrix entry): "
                            f"llama.cpp's {qtype.name} needs them; give --imatrix or pick another type")
    if qtype in I_QUANTS:
        rows = np.ascontiguousarray(data).reshape(-1, data.shape[-1])
        qw, widx = _weight_rows(data, weights, qtype) if weights is not None else (None, None)
        out = I_QUANTS[qtype].quantize_rows(rows, qw, widx)
        return out.reshape(*data.shape[:-1], data.shape[-1] // block_size(qtype) * type_size(qtype))
    if weights is not None and qtype in WEIGHTED_TYPES:
        from . import kquants_imatrix

        qw, widx = _weight_rows(data, weights, qtype)
        rows = np.ascontiguousarray(data).reshape(-1, data.shape[-1])
        with _KERNEL_LOCK:
            out = kquants_imatrix.WEIGHTED[qtype].quantize_rows(rows, qw, widx)
        return out.reshape(*data.shape[:-1], data.shape[-1] // block_size(qtype) * type_size(qtype))
    if qtype in LEGACY_FIXED:
        return LEGACY_FIXED[qtype].quantize_rows(np.ascontiguousarray(data))
    if qtype not in K_QUANTS:
        return gguf_quants.quantize(data, qtype)
    blocks = np.ascontiguousarray(data).reshape(-1, QK_K)
    kind = K_QUANTS[qtype]
    with _KERNEL_LOCK:  # the kernel only: the packing of one call overlaps the next call's kernel
        found = kind.search(blocks)
    out = kind.pack(*found)
    return out.reshape(*data.shape[:-1], data.shape[-1] // QK_K * type_size(qtype))


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Dequantize bytes [..., bytes_per_row] (as read from a GGUF) back to float32 [..., n_per_row]."""
    qtype = QT(qtype)
    return np.asarray(gguf_quants.dequantize(np.asarray(raw), qtype), dtype=np.float32)
