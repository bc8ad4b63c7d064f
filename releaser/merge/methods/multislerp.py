"""Multi-SLERP: a weighted barycentre of any number of models on the hypersphere (task vectors with a base model),
through the tangent space at their weighted mean direction; the result has the weighted mean norm."""

from __future__ import annotations

import torch

from releaser.errors import ConfigError
from releaser.merge.methods import REQUIRED, Method, Param, between, register


def multislerp(tensors, base_index, params, model_params, generator=None):
    others = [i for i in range(len(tensors)) if i != base_index]
    if len(others) == 1:
        return tensors[others[0]]
    eps = params["eps"]
    base = tensors[base_index] if base_index is not None else None
    stacked = torch.stack([tensors[i] for i in others])
    if base is not None:
        stacked -= base
    rows = stacked.view(len(others), -1)
    weights = torch.tensor([model_params[i]["weight"] for i in others], dtype=stacked.dtype, device=stacked.device)
    if params["normalize_weights"]:
        weights = weights / weights.sum()

    norms = torch.norm(rows, dim=-1, keepdim=True)
    units = rows / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(others) == 2:   # two opposite directions: fall back to the weighted sum
            out = (stacked[0] * weights[0] + stacked[1] * weights[1]).view(stacked.shape[1:])
            return out if base is None else out + base
        raise ConfigError("multislerp: the weighted directions of the models cancel out (opposite task vectors with "
                          "balancing weights); change the weights")
    mean = mean / mean_norm

    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    step = (tangents * weights.view(-1, 1)).sum(0)
    step_norm = torch.norm(step) + eps
    direction = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
    out = (direction * (norms.squeeze(-1) * weights).sum()).view(stacked.shape[1:])
    return out if base is None else out + base


def _weights_sum(params, model_params, base_index):
    weights = [mp["weight"] for i, mp in enumerate(model_params) if i != base_index and "weight" in mp]
    if params["normalize_weights"] and len(weights) > 1 and abs(sum(weights)) < 1e-8:
        return (f"the weights {weights} add up to 0, so normalize_weights would divide by zero; change a weight or "
                "set normalize_weights: false")
    return None


register(Method(
    name="multislerp",
    pretty_name="Multi-SLERP",
    reference_url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    description=(
        "Multi-SLERP generalises SLERP to any number of models: it projects the models onto the unit hypersphere, "
        "takes their weighted average in the tangent space at the weighted mean direction, maps it back to the sphere "
        "and restores the weighted mean norm. With a base model it works on the task vectors."
    ),
    fn=multislerp,
    global_params={"normalize_weights": True, "eps": Param(1e-8, check=between(0, None, low_open=True))},
    model_params={"weight": REQUIRED},
    base="optional",
    min_others=1,
    validate=_weights_sum,
))
