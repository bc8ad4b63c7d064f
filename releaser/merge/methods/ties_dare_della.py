"""The generalized task-arithmetic family (mergekit's table): task_arithmetic, ties, dare_ties, dare_linear,
breadcrumbs, breadcrumbs_ties, della, della_linear. The table ``_FAMILY`` below lists each one's sparsifier, sign
consensus and defaults.

All of them work on task vectors (model - base): each is sparsified (per model ``density``), weighted (per model
``weight``), optionally filtered by sign consensus (TIES), summed, optionally normalised by the sum of the weights that
contributed, scaled by ``lambda`` and added back to the base.
"""

from __future__ import annotations

from functools import partial

import torch

from releaser.merge.methods import REQUIRED, Method, Param, between, register
from releaser.merge.methods.sparsify import SPARSIFIERS


def sign_consensus(weighted: torch.Tensor, mask_dtype: torch.dtype) -> torch.Tensor:
    """Per element, keep the models whose sign agrees with the sign of the summed (weighted) deltas."""
    sign = weighted.sign().to(mask_dtype)
    majority = (weighted.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    return sign == majority


def task_arithmetic_merge(tensors, base_index, params, model_params, generator=None, *, sparsify=None,
                          consensus=False):
    base = tensors[base_index]
    others = [i for i in range(len(tensors)) if i != base_index]
    if not others:
        return base

    deltas = base.new_empty((len(others), *base.shape))
    for row, index in enumerate(others):
        delta = tensors[index] - base
        if sparsify is not None:
            mp = model_params[index]
            extra = {key: mp[key] for key in ("gamma", "epsilon") if key in mp}
            delta = SPARSIFIERS[sparsify](delta, mp["density"], params["rescale"], generator=generator, **extra)
        deltas[row] = delta
        del delta

    # Weights take the tensors' dtype (in bfloat16, 0.3 becomes 0.30078125), as in mergekit.
    weights = torch.tensor([model_params[i]["weight"] for i in others], dtype=deltas.dtype, device=deltas.device)
    while weights.dim() < deltas.dim():
        weights.unsqueeze_(-1)
    deltas.mul_(weights)

    if consensus:
        mask = sign_consensus(deltas, torch.int8 if params["int8_mask"] else base.dtype)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1

    if params["normalize"]:
        mixed /= divisor
    if params["lambda"] != 1:
        mixed *= params["lambda"]
    return (base + mixed).to(base.dtype)


_TA = "https://arxiv.org/abs/2212.04089"
_TIES = "https://arxiv.org/abs/2306.01708"
_DARE = "https://arxiv.org/abs/2311.03099"
_BREADCRUMBS = "https://arxiv.org/abs/2312.06795"
_DELLA = "https://arxiv.org/abs/2406.11617"

_COMMON = (
    " Task vectors are the differences between each model and the base model; the merged task vector is added back "
    "to the base, scaled by lambda."
)
_RESCALE = " Kept values are rescaled so that each task vector keeps its L1 norm."

# name, pretty name, paper, sparsifier, sign consensus, normalize default, rescale default, description
_FAMILY = [
    ("task_arithmetic", "Task Arithmetic", _TA, None, False, False, False,
     "Task arithmetic adds a weighted sum of task vectors to the base model."),
    ("ties", "TIES", _TIES, "magnitude", True, True, False,
     "TIES trims each task vector to its largest-magnitude entries (density), elects a sign per parameter from the "
     "weighted sum, and averages only the entries that agree with that sign."),
    ("dare_ties", "DARE TIES", _DARE, "random", True, False, True,
     "DARE TIES randomly drops entries of each task vector (keeping a density fraction), then applies TIES sign "
     "consensus before summing." + _RESCALE),
    ("dare_linear", "Linear DARE", _DARE, "random", False, False, True,
     "Linear DARE randomly drops entries of each task vector (keeping a density fraction) and sums the weighted "
     "results." + _RESCALE),
    ("breadcrumbs", "Model Breadcrumbs", _BREADCRUMBS, "magnitude_outliers", False, False, False,
     "Model Breadcrumbs removes both the largest outliers (a gamma fraction) and the smallest entries of each task "
     "vector, keeping a density fraction, and sums the weighted results."),
    ("breadcrumbs_ties", "Model Breadcrumbs with TIES", _BREADCRUMBS, "magnitude_outliers", True, False, False,
     "Model Breadcrumbs with TIES removes the largest outliers (a gamma fraction) and the smallest entries of each "
     "task vector, then applies TIES sign consensus before summing."),
    ("della", "DELLA", _DELLA, "della_magprune", True, True, True,
     "DELLA drops task-vector entries at random with a keep probability that grows with magnitude rank within each "
     "row (density plus or minus epsilon), then applies TIES sign consensus." + _RESCALE),
    ("della_linear", "Linear DELLA", _DELLA, "della_magprune", False, False, True,
     "Linear DELLA drops task-vector entries at random with a keep probability that grows with magnitude rank within "
     "each row (density plus or minus epsilon) and sums the weighted results." + _RESCALE),
]


def _della_ranges(params, model_params, base_index):
    for i, mp in enumerate(model_params):
        density, epsilon = mp.get("density", 1.0), mp.get("epsilon", 0.15)
        if i != base_index and 0 < density < 1 and not (0 < density - epsilon and density + epsilon < 1):
            return (f"della needs 0 < density - epsilon and density + epsilon < 1 (got density={density:g}, "
                    f"epsilon={epsilon:g}); lower epsilon or change density")
    return None


def _method(name, pretty, url, sparsify, consensus, normalize, rescale, text) -> Method:
    model_params = {"weight": REQUIRED,
                    "density": Param(1.0, check=between(0, 1, low_open=True), doc="fraction of each task vector kept")}
    if sparsify == "magnitude_outliers":
        model_params["gamma"] = Param(0.01, check=between(0, 1), doc="fraction of largest magnitudes dropped")
    if sparsify == "della_magprune":
        model_params["epsilon"] = Param(0.15, check=between(0, 0.5, high_open=True),
                                        doc="spread of keep probabilities around density")
    return Method(
        name=name,
        pretty_name=pretty,
        reference_url=url,
        description=text + _COMMON,
        fn=partial(task_arithmetic_merge, sparsify=sparsify, consensus=consensus),
        global_params={"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0},
        model_params=model_params,
        base="required",
        min_models=1,
        random=sparsify in ("random", "della_magprune"),
        validate=_della_ranges if sparsify == "della_magprune" else None,
    )


register(*(_method(*row) for row in _FAMILY))
