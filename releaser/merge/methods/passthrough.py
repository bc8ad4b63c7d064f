"""Passthrough: copy one input tensor (optionally scaled); used for frankenmerges and layer stacking with slices."""

from __future__ import annotations

from releaser.merge.methods import Method, register


def passthrough(tensors, base_index, params, model_params, generator=None):
    scale = model_params[0].get("scale") if model_params else None
    return tensors[0] if scale is None else tensors[0] * scale


register(Method(
    name="passthrough",
    pretty_name="Passthrough",
    reference_url="https://github.com/arcee-ai/mergekit",
    description=(
        "Passthrough copies tensors unchanged from a single source model per output tensor (optionally multiplied by a "
        "per-model scale). With slices it stacks layer ranges from one or more models into a new, deeper model "
        "(a \"frankenmerge\")."
    ),
    fn=passthrough,
    model_params={"scale": None},
    base="ignored",   # every input counts, a base_model too
    min_models=1,
    max_models=1,
    base_model_params=True,
))
