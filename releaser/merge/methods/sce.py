"""SCE (select, calculate, erase): keep the positions where the models' task vectors vary most, weight each model by
the mean square of its task vector, and drop entries whose sign disagrees with the consensus."""

from __future__ import annotations

import torch

from releaser.merge.methods import Method, Param, between, register
from releaser.merge.methods.ties_dare_della import sign_consensus


def _variance_mask(deltas: torch.Tensor, fraction: float, dtype: torch.dtype) -> torch.Tensor:
    """1 at the top ``fraction`` of the (nonzero-variance) positions by variance across the models."""
    if fraction <= 0:
        return torch.zeros_like(deltas[0], dtype=dtype)
    if fraction >= 1:
        return torch.ones_like(deltas[0], dtype=dtype)
    var = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * fraction)
    mask = torch.zeros_like(var, dtype=dtype)
    if k == 0:
        return mask
    _, top = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask.view(-1)[top] = 1
    return mask


def _model_weights(deltas: torch.Tensor) -> torch.Tensor:
    weights = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    if abs(total) < 1e-6:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / total


def sce(tensors, base_index, params, model_params, generator=None):
    base = tensors[base_index]
    others = [t for i, t in enumerate(tensors) if i != base_index]
    if not others:
        return base
    mask_dtype = torch.int8 if params["int8_mask"] else base.dtype
    deltas = torch.stack([t - base for t in others], dim=0)
    if params["select_topk"] < 1:
        deltas = deltas * _variance_mask(deltas, params["select_topk"], mask_dtype).unsqueeze(0)
    keep = sign_consensus(deltas, mask_dtype)
    weights = _model_weights(deltas)
    while weights.dim() < deltas.dim():
        weights = weights.unsqueeze(-1)
    kept_weights = weights * keep
    merged = (deltas * kept_weights).sum(dim=0) / torch.sum(kept_weights, dim=0).clamp(min=1e-6)
    return base + merged


register(Method(
    name="sce",
    pretty_name="SCE",
    reference_url="https://arxiv.org/abs/2408.07990",
    description=(
        "SCE merges task vectors in three steps: select the positions where the models differ most (the top "
        "select_topk fraction by variance), calculate a weight per model from the mean square of its task vector, "
        "and erase entries whose sign disagrees with the majority before averaging. Per-model weights are not used."
    ),
    fn=sce,
    global_params={"int8_mask": False, "select_topk": Param(1.0, check=between(0, 1))},
    base="required",
))
