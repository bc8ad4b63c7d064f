"""Linear merge: a weighted average of the input tensors."""

from __future__ import annotations

import torch

from releaser.errors import ConfigError
from releaser.merge.methods import REQUIRED, Method, register


def _accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def linear(tensors, base_index, params, model_params, generator=None):
    # Every input counts, the base model included (mergekit ignores the base for linear).
    first = tensors[0]
    if any(mp.get("weight") is None for mp in model_params):
        raise ConfigError("linear needs parameters.weight for every model, base_model included: add the missing weight")
    dtype = _accumulation_dtype(first)
    # Weights stay float32 (float64 for float64 inputs), one row as in mergekit's batch layout.
    weights = torch.tensor([[mp["weight"] for mp in model_params]], dtype=dtype, device=first.device)
    coefficient_shape = (1,) * first.ndim
    result = torch.zeros_like(first, dtype=dtype)
    for tensor, coefficient in zip(tensors, weights[0]):
        result.addcmul_(tensor, coefficient.reshape(coefficient_shape))
    if params["normalize"]:
        result.div_(weights.sum(dim=1).reshape(coefficient_shape))
    return result.to(first.dtype)


def _weights_sum(params, model_params, base_index):
    weights = [mp["weight"] for mp in model_params if mp.get("weight") is not None]
    if params["normalize"] and weights and abs(sum(weights)) < 1e-8:
        return (f"the weights {weights} add up to 0, so normalize would divide by zero; change a weight or set "
                "normalize: false")
    return None


register(Method(
    name="linear",
    pretty_name="Linear",
    reference_url="https://arxiv.org/abs/2203.05482",
    description=(
        "Linear merging (a \"model soup\") takes a weighted average of the parameters of the input models, tensor by "
        "tensor. With normalize on (the default) the weights are divided by their sum, so they need not add up to one."
    ),
    fn=linear,
    global_params={"normalize": True},
    model_params={"weight": REQUIRED},
    base="ignored",   # every input counts, a base_model too
    min_models=1,
    validate=_weights_sum,
    base_model_params=True,
))
