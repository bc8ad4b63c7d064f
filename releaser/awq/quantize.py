"""Group-wise asymmetric (zero-point) 4-bit quantization, as AutoAWQ's ``pseudo_quantize_tensor`` does it.

Groups are ``group_size`` consecutive input features of one output row. ``scale = max(max - min, 1e-5) / 15``,
``zero = clamp(-round(min / scale), 0, 15)``, ``q = clamp(round(w / scale) + zero, 0, 15)``, ``w' = (q - zero) * scale``
(round half to even). The final quantization rounds the scale to float16 first (the checkpoint stores float16 scales),
so dequantizing the checkpoint gives exactly the fake-quantized weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ModelError

MAX_Q = 15
GROUP_SIZES = (128, 64, 32)


def choose_group_size(requested: int, widths: dict[str, int]) -> int:
    """The largest of ``requested`` and the smaller standard sizes (64, 32) that divides every input width."""
    candidates = [g for g in GROUP_SIZES if g <= requested]
    for g in candidates:
        if all(w % g == 0 for w in widths.values()):
            return g
    bad = ", ".join(f"{name} {w}" for name, w in widths.items() if w % candidates[-1])
    raise ModelError(f"no usable AWQ group size: the input widths ({bad}) are not multiples of "
                     f"{'/'.join(map(str, candidates))}; this model cannot be written in the AWQ GEMM format")


def fake_quantize(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Quantize and dequantize ``w`` [N, K] group-wise in its own dtype (the scale and clip searches use this)."""
    return fake_quantize_(w.clone(), group_size)


def fake_quantize_(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """:func:`fake_quantize` in place (contiguous ``w``; one min/max pass, no full-size temporaries)."""
    g = w.view(-1, group_size)
    lo, hi = torch.aminmax(g, dim=1, keepdim=True)
    scale = (hi - lo).clamp_(min=1e-5).div_(MAX_Q)
    zero = torch.round(lo / scale).neg_().clamp_(0, MAX_Q)
    g.div_(scale).round_().add_(zero).clamp_(0, MAX_Q).sub_(zero).mul_(scale)
    return w


@dataclass
class Quantized:
    codes: torch.Tensor    # uint8 [N, K], 0..15
    zeros: torch.Tensor    # uint8 [N, K / group_size], 0..15
    scales: torch.Tensor   # float16 [N, K / group_size]
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]: ``(q - z) * s`` with the float16 scales, which is what a loader computes."""
        g = self.group_size
        z = self.zeros.to(torch.float32).repeat_interleave(g, 1)
        s = self.scales.to(torch.float32).repeat_interleave(g, 1)
        return (self.codes.to(torch.float32) - z) * s


def quantize(w: torch.Tensor, group_size: int) -> Quantized:
    """Final quantization of ``w`` [N, K] (float32 math, float16-rounded scales) into codes, zeros and scales."""
    n, k = w.shape
    g = w.to(torch.float32).reshape(n, k // group_size, group_size)
    hi, lo = g.amax(dim=2, keepdim=True), g.amin(dim=2, keepdim=True)
    scale16 = ((hi - lo).clamp(min=1e-5) / MAX_Q).to(torch.float16)
    scale16 = torch.where(scale16 > 0, scale16, torch.tensor(2.0**-24, dtype=torch.float16, device=w.device))
    scale = scale16.to(torch.float32)
    zero = (-torch.round(lo / scale)).clamp(0, MAX_Q)
    q = (torch.round(g / scale) + zero).clamp(0, MAX_Q)
    return Quantized(q.reshape(n, k).to(torch.uint8), zero.squeeze(2).to(torch.uint8), scale16.squeeze(2), group_size)
