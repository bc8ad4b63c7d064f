"""NearSwap: take the other model's value where it is close to the base (within ``t``), blend further away."""

from __future__ import annotations

import torch

from releaser.merge.methods import REQUIRED, Method, Param, between, register


def nearswap(tensors, base_index, params, model_params, generator=None):
    if len(tensors) == 1:   # only the base has this tensor
        return tensors[0]
    base, other = tensors[base_index], tensors[1 - base_index]
    weight = (params["t"] / torch.abs(base - other).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


register(Method(
    name="nearswap",
    pretty_name="NearSwap",
    reference_url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    description=(
        "NearSwap takes the other model's parameter wherever it lies within t of the base model's, and moves only "
        "part of the way (t divided by the distance) where the two differ more, so small differences are adopted and "
        "large ones are damped."
    ),
    fn=nearswap,
    global_params={"t": Param(REQUIRED, float, check=between(0, None))},
    base="required",
    min_models=2,
    max_models=2,
))
