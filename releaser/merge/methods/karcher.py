"""Karcher mean: the Riemannian centre of mass of all inputs on the unit hypersphere (equal weights, the base model
is just another input), found by iteration, scaled by the mean of the inputs' norms."""

from __future__ import annotations

import torch

from releaser.merge.methods import Method, Param, between, register


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    stats = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(t.to(stats)) for t in tensors]
    units = [torch.zeros_like(t) if n.item() == 0.0 else (t / n).to(t.dtype) for t, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(t * 0 for t in tensors)
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    points = [units[i] for i in valid]

    mean = torch.zeros_like(points[0])
    for w, u in zip(weights, points):
        mean += w * u
    mean_norm = torch.linalg.vector_norm(mean.to(stats))
    mean = points[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, points):
            cos = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            tangent += w * (theta / torch.sin(theta)) * (u - cos * mean)
        length = torch.linalg.vector_norm(tangent.to(stats))
        if length.item() < tol:
            break
        mean = (torch.cos(length) * mean + torch.sin(length) * (tangent / length)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(stats))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(a * n for a, n in zip(alphas, norms))
    return scale * mean


def karcher(tensors, base_index, params, model_params, generator=None):
    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors)
    return karcher_mean(list(tensors), alphas, params["max_iter"], params["tol"])


register(Method(
    name="karcher",
    pretty_name="Karcher Mean",
    reference_url="https://arxiv.org/abs/2603.04972",
    description=(
        "The Karcher mean is the centre of mass of the models on the unit hypersphere, found by iterating towards the "
        "point that minimises the summed squared angles to every model (all models weigh the same; a base model is "
        "just another input). The result is scaled by the models' average norm."
    ),
    fn=karcher,
    global_params={"max_iter": Param(10, check=between(1, None)),
                   "tol": Param(1e-5, check=between(0, None, low_open=True))},
    base="ignored",
))
