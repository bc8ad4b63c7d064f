"""NuSLERP: spherical interpolation of exactly two models (or of their task vectors when there is a base model),
with ``t`` taken from the two models' weights; whole tensors, or row by row, or column by column."""

from __future__ import annotations

import torch

from releaser.merge.methods import REQUIRED, Method, register

COLINEAR_EPS = 1e-8
NORM_EPS = 1e-7


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=NORM_EPS)


def slerp_rows(t: float, v0: torch.Tensor, v1: torch.Tensor, flatten: bool, columns: bool) -> torch.Tensor:
    """SLERP along the last dimension (every row a vector), of the whole tensor (``flatten``) or of its columns."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif columns:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    cos = torch.sum(_unit(v0) * _unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= COLINEAR_EPS ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)   # (anti)parallel vectors: plain lerp
    if columns and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp(tensors, base_index, params, model_params, generator=None):
    others = [i for i in range(len(tensors)) if i != base_index]
    if len(others) == 1:   # only one model has this tensor
        return tensors[others[0]]
    w0, w1 = (model_params[i]["weight"] for i in others)
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    a, b = tensors[others[0]], tensors[others[1]]
    flatten, columns = params["nuslerp_flatten"], params["nuslerp_row_wise"]
    if base_index is None:
        return slerp_rows(t, a, b, flatten, columns)
    base = tensors[base_index]
    return base + slerp_rows(t, a - base, b - base, flatten, columns)


register(Method(
    name="nuslerp",
    pretty_name="NuSLERP",
    reference_url="https://github.com/arcee-ai/mergekit",
    description=(
        "NuSLERP interpolates two models along the arc between them, with the interpolation factor taken from the "
        "two models' weights (t = w2 / (w1 + w2)). With a base model it interpolates their task vectors and adds the "
        "result to the base. Tensors are treated as one vector, or row by row (nuslerp_flatten: false), or column by "
        "column (nuslerp_row_wise: true)."
    ),
    fn=nuslerp,
    global_params={"nuslerp_row_wise": False, "nuslerp_flatten": True},
    model_params={"weight": REQUIRED},
    base="optional",
    min_others=2,
    max_others=2,
))
