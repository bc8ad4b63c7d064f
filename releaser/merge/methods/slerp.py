"""SLERP: spherical linear interpolation between the base model and one other model, one flattened vector per tensor.

Statistics (norms, dot product) are accumulated in float32 (float64 for float64 inputs) over fixed chunks of
``_CHUNK_ELEMENTS`` elements, in the same order as mergekit 0.1.5, so results are bit-identical to it.
"""

from __future__ import annotations

import torch

from releaser.merge.methods import REQUIRED, Method, register

_CHUNK_ELEMENTS = 1024 * 1024
DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Interpolate from ``v0`` (t=0) to ``v1`` (t=1); the result has ``v0``'s shape and dtype.

    The same float operations as mergekit 0.1.5 (one output row, statistics per chunk), with each input converted to
    the working dtype once and scratch buffers reused across chunks.
    """
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(1, -1).to(dtype)
    b = v1.reshape(1, -1).to(dtype)
    t = torch.tensor([t], dtype=dtype, device=v0.device).reshape(-1, 1)
    n = a.shape[1]
    if not n:
        return ((1 - t) * a + t * b).reshape(v0.shape).to(v0.dtype)
    starts = range(0, n, _CHUNK_ELEMENTS)

    def norm(x: torch.Tensor) -> torch.Tensor:
        parts = [torch.linalg.vector_norm(x[:, s:s + _CHUNK_ELEMENTS], dim=1, keepdim=True) for s in starts]
        value = torch.linalg.vector_norm(torch.stack(parts), dim=0)
        return torch.where(value > NORM_EPS, value, 1)

    norm_a, norm_b = norm(a), norm(b)
    width = min(n, _CHUNK_ELEMENTS)
    xa = a.new_empty((1, width))
    xb = a.new_empty((1, width))
    parts = []
    for s in starts:
        m = min(width, n - s)
        x, y = xa[:, :m], xb[:, :m]
        torch.div(a[:, s:s + m], norm_a, out=x)
        torch.div(b[:, s:s + m], norm_b, out=y)
        parts.append(x.mul_(y).sum(dim=1, keepdim=True))
    dot = torch.stack(parts).sum(dim=0).clamp(-1, 1)

    # Nearly (anti)parallel vectors: plain lerp of the unnormalised tensors.
    use_lerp = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(use_lerp, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(use_lerp, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(use_lerp, t, torch.sin(t * theta) / sin_theta)

    # a and b are fresh copies unless the inputs were already in the working dtype: only then allocate
    out = torch.mul(a, coef_a, out=a if a.data_ptr() != v0.data_ptr() else None)
    out += torch.mul(b, coef_b, out=b if b.data_ptr() != v1.data_ptr() else None)
    return out.reshape(v0.shape).to(v0.dtype)


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
