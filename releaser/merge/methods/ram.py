"""RAM and RAM+ (tensor-local): task vectors summed where only one model changes a parameter and averaged where
several do; RAM+ boosts each model's unique changes by how much it overlaps with the others."""

from __future__ import annotations

from functools import partial

import torch

from releaser.merge.methods import Method, Param, between, register


def _masks(others: list[torch.Tensor], base: torch.Tensor, epsilon: float):
    deltas = torch.stack([t - base for t in others], dim=0).view(len(others), -1)
    active = deltas.abs() > epsilon
    count = active.sum(dim=0, keepdim=True)
    return deltas, active, count, count > 1, count == 1


def ram(tensors, base_index, params, model_params, generator=None, *, plus: bool = False):
    base = tensors[base_index]
    others = [t for i, t in enumerate(tensors) if i != base_index]
    if not others:
        return base
    epsilon = params["epsilon"]
    deltas, active, count, shared, unique = _masks(others, base, epsilon)
    kept = deltas * active
    if plus:
        ratio = (active & shared).sum(dim=1) / (active & unique).sum(dim=1).clamp(min=epsilon)
        boost = 1 + params["r"] * ratio.clamp(min=0, max=params["alpha"])
        unique_part = kept * unique * boost.unsqueeze(-1)
    else:
        unique_part = kept * unique
    merged = (unique_part + kept * shared / count.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


_EPSILON = Param(1e-5, check=between(0, None))
_URL = "https://arxiv.org/abs/2601.13572"

register(
    Method(
        name="ram",
        pretty_name="Reinforced Agent Merging",
        reference_url=_URL,
        description=(
            "RAM merges task vectors position by position: a change made by only one model is kept as is, and changes "
            "made by several models (larger than epsilon) are averaged over those models."
        ),
        fn=ram,
        global_params={"epsilon": _EPSILON},
        base="required",
    ),
    Method(
        name="ramplus_tl",
        pretty_name="Reinforced Agent Merging Plus (Tensor-Local)",
        reference_url=_URL,
        description=(
            "RAM+ (tensor-local) works like RAM, averaging changes several models share and keeping unique ones, and "
            "scales each model's unique changes up by 1 + r times its ratio of shared to unique changes (capped at "
            "alpha), computed per tensor."
        ),
        fn=partial(ram, plus=True),
        global_params={"r": 0.1, "alpha": 0.2, "epsilon": _EPSILON},
        base="required",
    ),
)
