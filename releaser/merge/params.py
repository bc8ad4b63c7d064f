"""Strict parameters: every parameter a config sets must be used by the method at the level it is set, every layer
gradient must fit the output's layers, and a ``filter`` that matches no tensor is reported."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from typing import Any

from ..errors import ConfigError
from .config import Conditional, MergeConfig
from .methods import Method, all_parameter_names


def settings(cfg: MergeConfig) -> Iterator[tuple[str, str, str, Any]]:
    """(YAML path of the parameters block, level, parameter name, setting) for every parameter the config sets;
    level is "global" (top level or a slice) or "model" (a model or a slice source)."""
    for name, value in (cfg.parameters or {}).items():
        yield "parameters", "global", name, value
    for i, m in enumerate(cfg.models or []):
        for name, value in (m.parameters or {}).items():
            yield f"models[{i}].parameters", "model", name, value
    for i, s in enumerate(cfg.slices or []):
        for name, value in (s.parameters or {}).items():
            yield f"slices[{i}].parameters", "global", name, value
        for j, src in enumerate(s.sources):
            for name, value in (src.parameters or {}).items():
                yield f"slices[{i}].sources[{j}].parameters", "model", name, value


def check_names(cfg: MergeConfig, method: Method) -> None:
    """A parameter the method does not read where it is set is an error naming it, its path and the closest name."""
    valid = [*method.global_specs, *method.model_specs]
    for path, level, name, _ in settings(cfg):
        if name in method.model_specs or (name in method.global_specs and level == "global"):
            continue
        where = f"`{path}.{name}`"
        if name in method.global_specs:
            raise ConfigError(f"{where}: `{name}` is one value for the whole merge in {method.name}, not a per-model "
                              f"parameter; move it to the top-level `parameters:` (or a slice's)")
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
        owners = all_parameter_names().get(name)
        if close:
            hint = f"did you mean `{close[0]}`?"
        elif owners:
            hint = f"it is a parameter of {', '.join(owners)}"
        else:
            hint = "check its spelling"
        known = ", ".join(f"`{v}`" for v in valid) or "none"
        raise ConfigError(f"{where}: merge_method {method.name} has no parameter `{name}`; {hint} "
                          f"({method.name} takes {known})")


def _gradients(value: Any) -> Iterator[dict]:
    if isinstance(value, dict):
        yield value
    elif isinstance(value, Conditional):
        yield from _gradients(value.value)
    elif isinstance(value, list):
        for v in value:
            if isinstance(v, Conditional):
                yield from _gradients(v.value)


def check_layer_gradients(cfg: MergeConfig, n_layers: int) -> None:
    """Layer-gradient keys must be output layer indices (0 .. n_layers - 1)."""
    for path, _, name, value in settings(cfg):
        for gradient in _gradients(value):
            bad = [k for k in gradient if k >= n_layers]
            if bad:
                raise ConfigError(f"`{path}.{name}`: layer {bad[0]} is out of range; the merged model has "
                                  f"{n_layers} layers (use indices 0 to {n_layers - 1})")


def filters(cfg: MergeConfig) -> Iterator[tuple[str, str]]:
    """(YAML path, filter) for every conditional parameter value with a real filter."""
    for path, _, name, value in settings(cfg):
        items = [value] if isinstance(value, Conditional) else value if isinstance(value, list) else []
        for k, cond in enumerate(items):
            if isinstance(cond, Conditional) and cond.filter not in (None, "*"):
                yield f"{path}.{name}[{k}].filter", cond.filter


def unused_filters(cfg: MergeConfig, tensor_names: Iterable[str]) -> list[str]:
    """Warnings for filters that match no tensor name (their value never applies)."""
    names = list(tensor_names)
    return [f"`{path}` {flt!r} matches no tensor, so its value never applies; check the filter"
            for path, flt in filters(cfg) if not any(flt in n for n in names)]
