"""Model Stock: interpolate between the base and the average of the others by the angle between their task vectors."""

from __future__ import annotations

import torch

from releaser.merge.methods import Method, register


def model_stock(tensors, base_index, params, model_params, generator=None):
    base = tensors[base_index]
    others = [t for i, t in enumerate(tensors) if i != base_index]
    shape = base.shape
    if params["filter_wise"]:  # one angle per row
        if base.dim() == 1:
            base = base.unsqueeze(0)
            others = [t.unsqueeze(0) for t in others]
    else:  # one angle for the whole tensor
        base = base.reshape(-1)
        others = [t.reshape(-1) for t in others]

    offsets = [t - base for t in others]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)

    n = len(others)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6  # no finite estimate: keep the base there
    ratio = torch.where(singular, torch.zeros_like(cos),
                        (n * cos) / torch.where(singular, torch.ones_like(denominator), denominator))
    average = sum(others) / n
    return (ratio * average + (1 - ratio) * base).reshape(shape)


register(Method(
    name="model_stock",
    pretty_name="Model Stock",
    reference_url="https://arxiv.org/abs/2403.19522",
    description=(
        "Model Stock averages the fine-tuned models and moves that average back toward the base model by a ratio "
        "computed from the angle between the models' task vectors (the more they agree, the closer to the average). "
        "With filter_wise the angle is computed per row instead of per tensor."
    ),
    fn=model_stock,
    global_params={"filter_wise": False},
    base="required",
    min_models=3,
))
