"""The activation-aware scale search, folding scales into the preceding op, and the clipping search (AutoAWQ's
``_search_best_scale``/``apply_scale``/``_search_best_clip``, in the block's compute dtype, losses in float32)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .quantize import fake_quantize_

N_GRID = 20          # scale ratios 0/20 .. 19/20
CLIP_STEPS = 10      # clip shrink 1.00, 0.95, ..., 0.55
CLIP_TOKENS = 512    # tokens sampled for the clipping search
CLIP_CHUNK = 1 << 22  # weights per chunk of rows in the clipping search


def weight_mean(linears: Sequence[nn.Linear], group_size: int) -> torch.Tensor:
    """Mean over output rows of |w| / group abs-max, per input channel (AutoAWQ's w_mean)."""
    w = torch.cat([m.weight.detach() for m in linears], dim=0).float()
    g = w.abs().reshape(-1, group_size)
    g = g / (g.amax(dim=1, keepdim=True) + 1e-6)
    return g.reshape(w.shape).mean(0)


def squared_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Sum of squared differences in float32 (callers divide by the element count)."""
    return float(torch.nn.functional.mse_loss(out.float(), ref.float(), reduction="sum"))


def search_scale(linears: Sequence[nn.Linear], x_mean: torch.Tensor, group_size: int,
                 loss: Callable[[], float]) -> tuple[torch.Tensor, float]:
    """Try ``s = x_mean^r / (w_mean^(1-r) + 1e-4)`` for r = 0/20 .. 19/20: quantize ``W diag(s)``, unscale, measure
    ``loss()`` (the inspected module's output error with the current weights); return the best s (float32) and ratio.
    The linears' weights are restored afterwards."""
    w_mean = weight_mean(linears, group_size).to(x_mean.device)
    x_mean = x_mean.float()
    originals = [m.weight.detach().clone() for m in linears]
    best, best_loss, best_ratio = None, float("inf"), -1.0
    try:
        for k in range(N_GRID):
            r = k / N_GRID
            s = (x_mean.pow(r) / (w_mean.pow(1 - r) + 1e-4)).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            s[torch.isinf(s) | torch.isnan(s)] = 1
            sv = s.to(originals[0].dtype).view(1, -1)
            with torch.no_grad():
                for m, w in zip(linears, originals):
                    m.weight.copy_(fake_quantize_(w * sv, group_size).div_(sv))
            value = loss()
            if value < best_loss:
                best, best_loss, best_ratio = s.clone(), value, r
    finally:
        with torch.no_grad():
            for m, w in zip(linears, originals):
                m.weight.copy_(w)
    if best is None:   # every loss was nan/inf: keep the weights as they are
        best = torch.ones_like(x_mean)
    return best, best_ratio


@torch.no_grad()
def fold_into_norm(norm: nn.Module, linears: Sequence[nn.Linear], s: torch.Tensor) -> None:
    """norm.weight /= s and each linear's input columns *= s (the block computes the same function)."""
    s = s.to(norm.weight.device)
    norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))
    for m in linears:
        m.weight.mul_(s.to(m.weight.dtype).view(1, -1))


@torch.no_grad()
def fold_into_linear(prev: nn.Linear, nxt: nn.Linear, s: torch.Tensor) -> None:
    """prev's last len(s) output rows (and bias) /= s, next's input columns *= s."""
    s = s.to(prev.weight.device)
    n = s.numel()
    prev.weight[-n:].div_(s.to(prev.weight.dtype).view(-1, 1))
    if prev.bias is not None:
        prev.bias[-n:].div_(s.to(prev.bias.dtype))
    nxt.weight.mul_(s.to(nxt.weight.dtype).view(1, -1))


@torch.no_grad()
def search_clip(weight: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-(row, group) clipping bound [N, G] that minimises the mean squared error of the group partial products on
    up to 512 sampled tokens of ``x`` [T, K] (bounds 1.00 .. 0.55 of the group abs-max), as AutoAWQ's clip search.

    The error of one row and group, mean_t (x_t . d)^2 with d = w_clipped_quantized - w, equals d^T C d with the
    group's Gram matrix C = X^T X / T, which costs group_size instead of T multiply-adds per weight and bound."""
    n, k = weight.shape
    groups = k // group_size
    step = max(1, x.shape[0] // CLIP_TOKENS)
    xg = x[::step].float().reshape(-1, groups, group_size).permute(1, 0, 2)      # [G, T, gs]
    gram = torch.bmm(xg.transpose(1, 2), xg) / xg.shape[1]                     # [G, gs, gs]
    w = weight.float().reshape(n, groups, group_size)
    best = torch.empty(n, groups, device=weight.device)
    rows = max(1, min(n, CLIP_CHUNK // (groups * group_size)))
    for a in range(0, n, rows):
        wb = w[a:a + rows]                                                       # [R, G, gs]
        org_max = wb.abs().amax(dim=-1, keepdim=True)                            # [R, G, 1]
        best_max = org_max.clone()
        min_err = torch.full_like(org_max, float("inf"))
        for i in range(CLIP_STEPS):
            max_val = org_max * (1 - i / N_GRID)
            d = fake_quantize_(torch.maximum(torch.minimum(wb, max_val), -max_val), group_size).sub_(wb)
            dt = d.transpose(0, 1)                                               # [G, R, gs]
            err = (torch.bmm(dt, gram) * dt).sum(-1).t().unsqueeze(-1)           # [R, G, 1]
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best_max = torch.where(better, max_val, best_max)
        best[a:a + rows] = best_max.squeeze(-1)
    return best


@torch.no_grad()
def apply_clip(linear: nn.Linear, max_val: torch.Tensor, group_size: int) -> None:
    w = linear.weight
    n, k = w.shape
    bound = max_val.to(w.dtype).unsqueeze(-1)
    g = w.view(n, k // group_size, group_size)
    g.copy_(torch.maximum(torch.minimum(g, bound), -bound))
