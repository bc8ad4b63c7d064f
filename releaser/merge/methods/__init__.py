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
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

REQUIRED = object()  # default value of a parameter the config must give


@dataclass(frozen=True)
class Method:
    name: str
    pretty_name: str
    reference_url: str
    description: str                      # one plain paragraph (used by model cards)
    fn: Callable[..., Any]
    global_params: dict[str, Any] = field(default_factory=dict)   # name -> default (or REQUIRED)
    model_params: dict[str, Any] = field(default_factory=dict)    # name -> default (or REQUIRED)
    base: str = "optional"                # "required" | "optional" | "forbidden"
    min_models: int = 1                   # counting the base model
    max_models: int | None = None
    random: bool = False                  # uses the generator (reproducible with random_seed)


_REGISTRY: dict[str, Method] = {}


def register(*methods: Method) -> None:
    for m in methods:
        _REGISTRY[m.name] = m


def _load_all() -> None:
    if _REGISTRY:
        return
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def get_method(name: str) -> Method:
    _load_all()
    return _REGISTRY[name]


def method_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)
