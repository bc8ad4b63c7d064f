"""A merge plan in words (``releaser merge --dry-run``): per group of output tensors that are merged alike, the method,
the sources and the resolved parameters, layer by layer, so a gradient can be checked before a long merge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import parse_config
from .planner import MergePlan, TensorJob, plan_merge


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={_value(v)}" for k, v in params.items() if v is not None)


def _signature(plan: MergePlan, job: TensorJob) -> tuple:
    arch = plan.arch
    src = tuple((mi, arch.layer_of(name)) for mi, name in job.sources)
    per = tuple(tuple(sorted((k, _value(v)) for k, v in mp.items())) for mp in job.model_params)
    return job.layer, src, job.base_index, tuple(sorted((k, _value(v)) for k, v in job.params.items())), per


def _suffix(plan: MergePlan, job: TensorJob) -> str:
    if job.layer is None:
        return job.name
    prefix = plan.arch.layer_name(job.layer, "")
    return job.name[len(prefix):] if job.name.startswith(prefix) else job.name


def describe_plan(plan: MergePlan) -> list[str]:
    """Lines describing ``plan``: the models, then one line per group of tensors merged with the same inputs and
    parameters (a layer's tensors usually form one or two groups)."""
    m = plan.method
    layers = len({j.layer for j in plan.jobs if j.layer is not None})
    lines = [f"merge_method {m.name} ({m.pretty_name}): {len(plan.labels or plan.models)} models, {layers} output "
             f"layers, {len(plan.jobs)} tensors"]
    for i, label in enumerate(plan.labels or plan.models):
        roles = {("base" if j.base_index is not None and j.sources[j.base_index][0] == i else "input")
                 for j in plan.jobs if any(mi == i for mi, _ in j.sources)}
        lines.append(f"  [{i}] {label}{' (base)' if roles == {'base'} else ''}")
    groups: dict[tuple, list[TensorJob]] = {}
    for job in sorted(plan.jobs, key=lambda j: (-1 if j.layer is None and j.name == plan.arch.embed else
                                                 (10**9 if j.layer is None else j.layer))):
        groups.setdefault(_signature(plan, job), []).append(job)
    for (layer, src, base_index, _, _), jobs in groups.items():
        first = jobs[0]
        where = "" if layer is None else f"layer {layer}: "
        names = [_suffix(plan, j) for j in jobs]
        shown = ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
        inputs = []
        for k, (mi, in_layer) in enumerate(src):
            tag = f"[{mi}]" + (f"@{in_layer}" if in_layer is not None and in_layer != layer else "")
            if k == base_index:
                tag += " base"
            extra = _params(first.model_params[k]) if k != base_index or m.base_model_params else ""
            inputs.append(f"{tag}{' ' + extra if extra else ''}")
        glob = _params(first.params)
        lines.append(f"{where}{shown} <- {'; '.join(inputs)}{' | ' + glob if glob else ''}")
    for text in plan.warnings:
        lines.append(f"warning: {text}")
    return lines


def dry_run(config: str | Path | dict) -> list[str]:
    """Plan the merge of ``config`` (reading only the models' headers) and describe it; nothing is written."""
    cfg, _ = parse_config(config)
    plan = plan_merge(cfg)
    try:
        return describe_plan(plan)
    finally:
        plan.close()
