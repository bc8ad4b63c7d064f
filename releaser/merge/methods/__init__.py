"""Merge methods: each one a pure function of tensors and declared parameters.

A method module defines one or more :class:`Method` objects and registers them with :func:`register`. The engine owns
everything else (reading, dtype casting, streaming, writing): a method only sees the tensors of one output tensor.

Calling convention of ``Method.fn``::

    fn(tensors: list[torch.Tensor],      # one per input model, already cast to the config ``dtype``, same shape
       base_index: int | None,           # index of the base model in ``tensors`` (None when there is no base)
       params: dict[str, Any],           # global parameters, evaluated for this tensor (defaults filled in)
       model_params: list[dict],         # per-input parameters, evaluated for this tensor (defaults filled in;
                                         #   the base model's entry may lack required keys)
       generator: torch.Generator | None # seeded per tensor when ``Method.random``; None otherwise
       ) -> torch.Tensor                 # same shape; the engine casts it to ``out_dtype``

Parameters are declared as ``name -> default`` (the type follows the default: bool, int, float, str or list) or as
``name -> Param(...)`` when the type or a valid range must be given explicitly (``Param(REQUIRED, float)``,
``Param(1.0, check=between(0, 1, low_open=True))``).
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

REQUIRED = object()  # default value of a parameter the config must give

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_KIND_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
               list: "a list of numbers"}


def between(low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False) -> Callable[[Any], str | None]:
    """A range check for :class:`Param`: returns what is wrong with a value, or None."""
    lo = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")

    def check(value: Any) -> str | None:
        values = value if isinstance(value, list) else [value]
        for v in values:
            bad = (low is not None and (v <= low if low_open else v < low)) or (
                high is not None and (v >= high if high_open else v > high))
            if bad:
                return f"must lie in {lo}, {hi}, got {v!r}"
        return None

    return check


@dataclass(frozen=True)
class Param:
    """A declared parameter: its default (or REQUIRED), its type and an optional range check."""

    default: Any = REQUIRED
    kind: type | None = None                              # bool, int, float, str or list (of numbers)
    check: Callable[[Any], str | None] | None = None      # what is wrong with a coerced value, or None
    doc: str = ""

    def __post_init__(self):
        if self.kind is None:
            kind = float if self.default is REQUIRED or self.default is None else type(self.default)
            object.__setattr__(self, "kind", kind)

    @property
    def kind_name(self) -> str:
        return _KIND_NAMES.get(self.kind, self.kind.__name__)

    def coerce(self, value: Any) -> Any:
        """The value as the method receives it; raises ValueError naming what was expected."""
        kind = self.kind
        out: Any = _MISSING
        if kind is bool:
            if isinstance(value, bool):
                out = value
            elif str(value).strip().lower() in _TRUE + _FALSE:
                out = str(value).strip().lower() in _TRUE
        elif kind is str:
            if isinstance(value, str):
                out = value
        elif kind is list:
            if isinstance(value, list) and all(_number(v) is not None for v in value):
                out = [_number(v) for v in value]
        elif kind is int:
            number = _number(value)
            if number is not None and float(number).is_integer():
                out = int(number)
        else:
            out = _number(value)
            out = _MISSING if out is None else float(out)
        if out is _MISSING:
            raise ValueError(f"must be {self.kind_name}, got {value!r}")
        if self.check is not None:
            problem = self.check(out)
            if problem:
                raise ValueError(problem)
        return out


_MISSING = object()


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value if not isinstance(value, float) or math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _spec(value: Any) -> Param:
    return value if isinstance(value, Param) else Param(value)


@dataclass(frozen=True)
class Method:
    name: str
    pretty_name: str
    reference_url: str
    description: str                      # one plain paragraph (used by model cards)
    fn: Callable[..., Any]
    global_params: dict[str, Any] = field(default_factory=dict)   # name -> default (or REQUIRED) or Param
    model_params: dict[str, Any] = field(default_factory=dict)    # name -> default (or REQUIRED) or Param
    base: str = "optional"                # "required" | "optional" | "forbidden" | "ignored" (just another input)
    min_models: int = 1                   # counting the base model
    max_models: int | None = None
    min_others: int | None = None         # models besides the base
    max_others: int | None = None
    random: bool = False                  # uses the generator (reproducible with random_seed)
    base_model_params: bool = False       # the base model takes per-model parameters too (mergekit's INPUT scope)
    # cross-parameter checks for one tensor: (params, model_params, base_index) -> problem or None
    validate: Callable[[dict, list[dict], int | None], str | None] | None = None
    global_specs: dict[str, Param] = field(default_factory=dict, init=False, compare=False, repr=False)
    model_specs: dict[str, Param] = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self):
        g = {k: _spec(v) for k, v in self.global_params.items()}
        m = {k: _spec(v) for k, v in self.model_params.items()}
        object.__setattr__(self, "global_specs", g)
        object.__setattr__(self, "model_specs", m)
        # name -> default, as methods and callers read them
        object.__setattr__(self, "global_params", {k: s.default for k, s in g.items()})
        object.__setattr__(self, "model_params", {k: s.default for k, s in m.items()})


_REGISTRY: dict[str, Method] = {}
_LOADED = False


def register(*methods: Method) -> None:
    for m in methods:
        _REGISTRY[m.name] = m


def _load_all() -> None:
    """Import every built-in method module once (methods registered by others before that are kept)."""
    global _LOADED
    if _LOADED:
        return
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    _LOADED = True


def get_method(name: str) -> Method:
    _load_all()
    return _REGISTRY[name]


def method_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def all_parameter_names() -> dict[str, list[str]]:
    """Every parameter any registered method declares -> the methods declaring it."""
    _load_all()
    out: dict[str, list[str]] = {}
    for m in sorted(_REGISTRY.values(), key=lambda m: m.name):
        for p in {**m.global_specs, **m.model_specs}:
            out.setdefault(p, []).append(m.name)
    return out
