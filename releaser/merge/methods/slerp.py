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


def _chunks(n: int, size: int):
    return range(0, n, size)


def slerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Interpolate from ``v0`` (t=0) to ``v1`` (t=1); the result has ``v0``'s shape and dtype."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    # One output row, as mergekit lays out a single tensor group: [1, numel].
    a = v0.reshape(1, -1)
    b = v1.reshape(1, -1)
    t = torch.tensor([t], dtype=dtype, device=v0.device).reshape(-1, 1)
    if not a.shape[1]:
        return ((1 - t) * a + t * b).reshape(v0.shape).to(v0.dtype)
    size = _CHUNK_ELEMENTS // a.shape[0]

    def chunk(x: torch.Tensor, start: int) -> torch.Tensor:
        return x[:, start:start + size].to(dtype)

    starts = _chunks(a.shape[1], size)
    norm_a = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(chunk(a, s), dim=1, keepdim=True) for s in starts]), dim=0)
    norm_b = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(chunk(b, s), dim=1, keepdim=True) for s in starts]), dim=0)
    norm_a = torch.where(norm_a > NORM_EPS, norm_a, 1)
    norm_b = torch.where(norm_b > NORM_EPS, norm_b, 1)
    dot = torch.stack([
        (chunk(a, s) / norm_a * (chunk(b, s) / norm_b)).sum(dim=1, keepdim=True) for s in starts
    ]).sum(dim=0).clamp(-1, 1)

    # Nearly (anti)parallel vectors: plain lerp of the unnormalised tensors.
    use_lerp = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(use_lerp, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(use_lerp, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(use_lerp, t, torch.sin(t * theta) / sin_theta)

    result = torch.empty_like(a)
    for s in starts:
        result[:, s:s + size] = coef_a * chunk(a, s) + coef_b * chunk(b, s)
    return result.reshape(v0.shape)


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
