"""Arcee Fusion: keep the other model's changes only where they matter most, by |change| times the per-row KL
divergence between the two models' softmax, above a median + 1.5 IQR threshold."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from releaser.merge.methods import Method, register

QUANTILE_SAMPLE = 1_000_000   # larger tensors: quantiles of a random sample of this many values


def _importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    p = F.softmax(other, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    return (other - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def _threshold(scores: torch.Tensor, generator) -> torch.Tensor:
    flat = scores.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), device=flat.device, generator=generator)]
    ordered, _ = torch.sort(flat)
    q1, median, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75]).to(ordered.device) * (ordered.numel() - 1)).long()]
    return median + 1.5 * (q3 - q1)


def arcee_fusion(tensors, base_index, params, model_params, generator=None):
    if len(tensors) == 1:
        return tensors[0]
    base, other = tensors[base_index], tensors[1 - base_index]
    scores = _importance(other, base)
    mask = (scores >= _threshold(scores, generator)).float()
    return base + (other - base) * mask


register(Method(
    name="arcee_fusion",
    pretty_name="Arcee Fusion",
    reference_url="https://arcee.ai",
    description=(
        "Arcee Fusion keeps only the most important changes of the other model: each parameter's change is scored by "
        "its size times the KL divergence between the two models' softmax over its row, and only changes scoring "
        "above the median plus 1.5 interquartile ranges are applied to the base model."
    ),
    fn=arcee_fusion,
    base="required",
    min_models=2,
    max_models=2,
    random=True,   # tensors over a million values: the quantiles come from a random sample
))
