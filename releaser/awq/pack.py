"""AutoAWQ GEMM packing: 4-bit codes packed along the output dimension, eight per int32, in AutoAWQ's nibble order.

For output columns ``8c .. 8c+7`` of row ``r``: ``word[r, c] = OR_i (v[r, 8c + ORDER[i]] << 4i)``, so nibble ``i`` holds
logical column ``8c + ORDER[i]``. Words are uint32 bit patterns stored as int32 (negative when nibble 7 >= 8).
"""

from __future__ import annotations

import torch

BITS = 4
PACK = 32 // BITS                      # codes per int32 word
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)       # nibble i holds column ORDER[i] of its block of eight
REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)     # column j lives in nibble REVERSE[j]


def pack(codes: torch.Tensor) -> torch.Tensor:
    """[rows, N] integer codes in 0..15 -> int32 [rows, N/8] (qweight for codes [K, N], qzeros for zeros [G, N])."""
    rows, n = codes.shape
    if n % PACK:
        raise ValueError(f"cannot pack {n} columns: the width must be a multiple of {PACK}")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > 15):
        raise ValueError("codes must be in 0..15")
    blocks = c.view(rows, n // PACK, PACK)[:, :, list(ORDER)]
    shifts = torch.arange(0, 32, BITS, dtype=torch.int64, device=c.device)
    words = (blocks << shifts).sum(-1)              # < 2**32, exact in int64
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack(words: torch.Tensor) -> torch.Tensor:
    """int32 [rows, N/8] -> uint8 codes [rows, N] (inverse of :func:`pack`)."""
    rows, m = words.shape
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, BITS, dtype=torch.int64, device=words.device)
    nibbles = (w.unsqueeze(-1) >> shifts) & 0xF     # [rows, m, 8], nibble i = column ORDER[i]
    return nibbles[:, :, list(REVERSE)].reshape(rows, m * PACK).to(torch.uint8)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 nn.Linear weight [N, K] of a GEMM layer: ``W[n, k] = (q[k, n] - z[k // g, n]) * s[k // g, n]``."""
    q = unpack(qweight).to(torch.float32)                                   # [K, N]
    z = unpack(qzeros).to(torch.float32).repeat_interleave(group_size, 0)   # [K, N]
    s = scales.to(torch.float32).repeat_interleave(group_size, 0)           # [K, N]
    return ((q - z) * s).t().contiguous()
