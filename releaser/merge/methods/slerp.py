"""SLERP: spherical linear interpolation between the base model and one other model, one flattened vector per tensor.

Statistics (norms, dot product) are accumulated in float32 (float64 for float64 inputs) over fixed chunks of
``_CHUNK_ELEMENTS`` elements, in the same order as mergekit 0.1.5, so results are bit-identical to it.
"""

from __future__ import annotations

import torch

from releaser.merge import scratch
from releaser.merge.methods import REQUIRED, Method, register

_CHUNK_ELEMENTS = 1024 * 1024
DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Interpolate from ``v0`` (t=0) to ``v1`` (t=1); the result has ``v0``'s shape and dtype.

    The same float operations as mergekit 0.1.5 (one output row, statistics per chunk, the inputs converted to the
    working dtype), done chunk by chunk: each chunk of an input is converted into a small reused buffer when it is
    used, so no working-dtype copy of a whole tensor is ever made.
    """
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    t = torch.tensor([t], dtype=dtype, device=v0.device).reshape(-1, 1)
    n = a.shape[1]
    if not n:
        return ((1 - t) * a.to(dtype) + t * b.to(dtype)).reshape(v0.shape).to(v0.dtype)
    starts = range(0, n, _CHUNK_ELEMENTS)
    width = min(n, _CHUNK_ELEMENTS)
    xa = torch.empty((1, width), dtype=dtype, device=v0.device)
    xb = torch.empty((1, width), dtype=dtype, device=v0.device)

    def chunk(x: torch.Tensor, s: int, buf: torch.Tensor) -> torch.Tensor:
        """``x[:, s:s + width]`` in the working dtype, in ``buf`` (a copy to write to)."""
        part = x[:, s:s + width]
        return buf[:, :part.shape[1]].copy_(part)

    def norm(x: torch.Tensor) -> torch.Tensor:
        parts = [torch.linalg.vector_norm(x[:, s:s + width] if x.dtype == dtype else chunk(x, s, xa),
                                          dim=1, keepdim=True) for s in starts]
        value = torch.linalg.vector_norm(torch.stack(parts), dim=0)
        return torch.where(value > NORM_EPS, value, 1)

    norm_a, norm_b = norm(a), norm(b)
    parts = []
    for s in starts:
        x, y = chunk(a, s, xa), chunk(b, s, xb)
        x.div_(norm_a)
        y.div_(norm_b)
        parts.append(x.mul_(y).sum(dim=1, keepdim=True))
    dot = torch.stack(parts).sum(dim=0).clamp(-1, 1)

    # Nearly (anti)parallel vectors: plain lerp of the unnormalised tensors.
    use_lerp = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(use_lerp, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(use_lerp, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(use_lerp, t, torch.sin(t * theta) / sin_theta)

    out = scratch.empty(a.shape, v0.dtype, v0.device)
    for s in starts:
        x, y = chunk(a, s, xa), chunk(b, s, xb)
        x.mul_(coef_a)
        x += y.mul_(coef_b)
        out[:, s:s + x.shape[1]].copy_(x)
    return out.reshape(v0.shape)


def slerp(tensors, base_index, params, model_params, generator=None):
    if len(tensors) == 1:  # only one model has this (optional) tensor
        return tensors[0]
    return slerp_vectors(params["t"], tensors[base_index], tensors[1 - base_index])


register(Method(
    name="slerp",
    pretty_name="SLERP",
    reference_url="https://en.wikipedia.org/wiki/Slerp",
    description=(
        "SLERP (spherical linear interpolation) blends two models along the arc between them instead of the straight "
        "line, treating each weight tensor as one vector. t=0 gives the base model and t=1 the other model; nearly "
        "parallel tensors fall back to linear interpolation. t is often given as a gradient over the layers."
    ),
    fn=slerp,
    global_params={"t": REQUIRED},
    base="required",
    min_models=2,
    max_models=2,
))
