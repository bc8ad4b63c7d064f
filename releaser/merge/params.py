"""Strict parameters: every parameter a config sets must be used by the method at the level it is set, every layer
gradient must fit the output's layers, and a ``filter`` that matches no tensor is reported."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator
from typing import Any

from ..errors import ConfigError
from .config import Conditional, MergeConfig
from .methods import Method, all_parameter_names, get_method, method_names


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


def lookup_method(cfg: MergeConfig) -> Method:
    """The config's merge method; an unknown name is an error with the closest known one."""
    try:
        return get_method(cfg.merge_method)
    except KeyError:
        names = method_names()
        close = difflib.get_close_matches(cfg.merge_method, names, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"`merge_method`: unknown merge method {cfg.merge_method!r}; {hint}the methods are "
                          f"{', '.join(names)}") from None


def check_names(cfg: MergeConfig, method: Method) -> list[str]:
    """Parameter names: one no method knows (a misspelling) is an error naming its path and the closest name; one the
    method does not read where it is set (``weight`` given to slerp, ``t`` under one model) is a warning, as mergekit
    ignores it. Returns the warnings."""
    valid = [*method.global_specs, *method.model_specs]
    ignored: dict[str, list[str]] = {}   # name -> the paths where the method does not read it
    for path, level, name, _ in settings(cfg):
        if name in method.model_specs or (name in method.global_specs and level == "global"):
            continue
        if name in method.global_specs or name in all_parameter_names():
            ignored.setdefault(name, []).append(f"`{path}.{name}`")
            continue
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
        hint = f"did you mean `{close[0]}`?" if close else "check its spelling"
        known = ", ".join(f"`{v}`" for v in valid) or "none"
        raise ConfigError(f"`{path}.{name}`: merge_method {method.name} has no parameter `{name}`; {hint} "
                          f"({method.name} takes {known})")
    warnings = []
    for name, paths in ignored.items():
        if name in method.global_specs:
            why, fix = "as a per-model parameter", "move it to the top-level `parameters:` (or a slice's)"
        else:
            why, fix = "at all", "remove it"
        warnings.append(f"{', '.join(paths)}: merge_method {method.name} does not read `{name}` {why}, so it is "
                        f"ignored (as mergekit does); {fix}")
    return warnings


def _values(setting: Any) -> Iterator[Any]:
    """Every value a setting can evaluate to at some tensor or layer: scalars, the ends of each gradient segment (a
    gradient lies between them) and each conditional's value. A list of non-numbers is one list value."""
    if isinstance(setting, Conditional):
        yield from _values(setting.value)
    elif isinstance(setting, dict):
        yield from setting.values()
    elif isinstance(setting, list) and any(isinstance(v, Conditional) for v in setting):
        for v in setting:
            yield from _values(v)
    elif isinstance(setting, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
        yield from setting
    else:
        yield setting


def check_values(cfg: MergeConfig, method: Method) -> None:
    """Each value a parameter can take has the type and range the method declares (before any model is read)."""
    for path, level, name, setting in settings(cfg):
        spec = method.model_specs.get(name) or (method.global_specs.get(name) if level == "global" else None)
        if spec is None:
            continue
        for value in _values(setting):
            candidates = [value] if spec.kind is not list or isinstance(value, list) else []
            for v in candidates:
                try:
                    spec.coerce(v)
                except ValueError as exc:
                    raise ConfigError(f"parameter `{name}` at `{path}.{name}`{_owner(cfg, path)} {exc}") from None


def _owner(cfg: MergeConfig, path: str) -> str:
    """' (for MODEL)' when ``path`` is a model's or a slice source's parameters block."""
    parts = [int(p) for p in re.findall(r"\[(\d+)\]", path)]
    if path.startswith("models["):
        return f" (for {cfg.models[parts[0]].model})"
    if ".sources[" in path:
        return f" (for {cfg.slices[parts[0]].sources[parts[1]].model})"
    return ""


def check_config(cfg: MergeConfig) -> list[str]:
    """What can be checked without reading a model: the method, parameter names and values. Returns the warnings."""
    method = lookup_method(cfg)
    warnings = check_names(cfg, method)
    check_values(cfg, method)
    return warnings


def refuse_warnings(warnings: list[str], strict: bool) -> None:
    """With ``strict`` (``--strict``), the first warning is an error."""
    if strict and warnings:
        raise ConfigError(f"{warnings[0]} (--strict makes every warning an error)")


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
