"""4-bit codes packed eight per int32, in the two layouts the formats releaser writes use (the one packer/unpacker).

- AutoAWQ GEMM (:func:`pack` / :func:`unpack`): along the output dimension, in AutoAWQ's nibble order. For output
  columns ``8c .. 8c+7`` of row ``r``: ``word[r, c] = OR_i (v[r, 8c + ORDER[i]] << 4i)``, so nibble ``i`` holds
  logical column ``8c + ORDER[i]``.
- In order (:func:`pack_rows` / :func:`unpack_rows`): along the last dimension, nibble ``i`` holds column ``8c + i``
  (compressed-tensors' ``pack-quantized`` weight_packed and, transposed, weight_zero_point; MLX's affine weights,
  read as uint32; ``bits`` 2, 4 or 8 for MLX).

Words are uint32 bit patterns stored as int32 (negative when the top nibble is >= 8) unless asked for as uint32.
"""

from __future__ import annotations

import torch

BITS = 4
PACK = 32 // BITS                      # codes per int32 word
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)       # nibble i holds column ORDER[i] of its block of eight
REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)     # column j lives in nibble REVERSE[j]
IN_ORDER = tuple(range(PACK))


def _pack(codes: torch.Tensor, order: tuple[int, ...], bits: int = BITS, unsigned: bool = False) -> torch.Tensor:
    per = 32 // bits
    *lead, n = codes.shape
    if n % per:
        raise ValueError(f"cannot pack {n} columns: the width must be a multiple of {per}")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes must be in 0..{(1 << bits) - 1}")
    blocks = c.reshape(*lead, n // per, per)[..., list(order)]
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=c.device)
    words = (blocks << shifts).sum(-1)              # < 2**32, exact in int64
    if unsigned:
        return words.to(torch.uint32)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def _unpack(words: torch.Tensor, reverse: tuple[int, ...], bits: int = BITS) -> torch.Tensor:
    per = 32 // bits
    *lead, m = words.shape
    w = (words.view(torch.int32) if words.dtype == torch.uint32 else words).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=words.device)
    values = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)     # [..., m, per], value i = column order[i]
    return values[..., list(reverse)].reshape(*lead, m * per).to(torch.uint8)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """[rows, N] integer codes in 0..15 -> int32 [rows, N/8] (qweight for codes [K, N], qzeros for zeros [G, N])."""
    return _pack(codes, ORDER)


def unpack(words: torch.Tensor) -> torch.Tensor:
    """int32 [rows, N/8] -> uint8 codes [rows, N] (inverse of :func:`pack`)."""
    return _unpack(words, REVERSE)


def pack_rows(codes: torch.Tensor, bits: int = BITS, unsigned: bool = False) -> torch.Tensor:
    """[..., N] codes in 0..2**bits-1 -> int32 (uint32 with ``unsigned``) [..., N*bits/32], value i of a word at
    bits ``i*bits`` (the in-order layout)."""
    return _pack(codes, tuple(range(32 // bits)), bits, unsigned)


def unpack_rows(words: torch.Tensor, bits: int = BITS) -> torch.Tensor:
    """int32 or uint32 [..., M] -> uint8 codes [..., M*32/bits] (inverse of :func:`pack_rows`)."""
    return _unpack(words, tuple(range(32 // bits)), bits)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 nn.Linear weight [N, K] of a GEMM layer: ``W[n, k] = (q[k, n] - z[k // g, n]) * s[k // g, n]``."""
    q = unpack(qweight).to(torch.float32)                                   # [K, N]
    z = unpack(qzeros).to(torch.float32).repeat_interleave(group_size, 0)   # [K, N]
    s = scales.to(torch.float32).repeat_interleave(group_size, 0)           # [K, N]
    return ((q - z) * s).t().contiguous()
