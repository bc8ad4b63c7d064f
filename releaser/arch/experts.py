"""Mixture-of-experts layers as data: where a family keeps its experts and its router, and the three layouts expert
weights come in, with the recipes that turn one into another.

- per expert (released checkpoints, what ``save_pretrained`` of transformers 5 writes back, what a merge writes):
  ``{layer}.mlp.experts.{e}.gate_proj.weight`` [ff, hidden], ``up_proj`` [ff, hidden], ``down_proj`` [hidden, ff];
- fused (transformers 5's module parameters, and what mergekit 0.1.5 writes): ``{layer}.mlp.experts.gate_up_proj``
  [E, 2 ff, hidden] (gate rows first) and ``{layer}.mlp.experts.down_proj`` [E, hidden, ff];
- stacked (llama.cpp's ``ffn_{gate,up,down}_exps``, named ``{layer}.mlp.experts.{proj}.weight`` as gguf-py's tensor
  map knows them): one [E, out, in] tensor per linear.

A recipe reads the tensors of one layout and builds one tensor of another, holding one layer's experts of one or two
linears at a time (never all layers). The router (``mlp.gate.weight``) is an ordinary per-layer tensor everywhere."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..errors import ModelError


@dataclass(frozen=True)
class Recipe:
    sources: tuple[str, ...]                         # the tensors read, in order
    shape: tuple[int, ...]                           # of the tensor built
    combine: Callable[[list[torch.Tensor]], torch.Tensor]
    stack: bool = False                              # sources are the experts, one per row of the result

    def build(self, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The float32 tensor, reading the sources one at a time (a stack of experts is filled in place, so the peak
        is the result and one expert)."""
        if self.stack:
            out = torch.empty(self.shape, dtype=torch.float32)
            for i, name in enumerate(self.sources):
                out[i] = read(name)
            return out
        return self.combine([read(n).to(torch.float32) for n in self.sources])


@dataclass(frozen=True)
class Experts:
    module: str = "mlp.experts"                      # block-relative module holding the experts
    linears: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    # transformers 5 parameters: name -> the per-expert linears concatenated along their rows
    fused: tuple[tuple[str, tuple[str, ...]], ...] = (("gate_up_proj", ("gate_proj", "up_proj")),
                                                      ("down_proj", ("down_proj",)))
    router: str = "mlp.gate.weight"                  # block-relative; kept in full precision by every quantizer
    # config.json keys of the expert count: released checkpoints say num_experts, transformers 5 writes
    # num_local_experts (its attribute_map), as llama.cpp's converter reads either
    count_keys: tuple[str, ...] = ("num_experts", "num_local_experts")
    used_key: str = "num_experts_per_tok"
    ff_key: str = "moe_intermediate_size"

    def count(self, config: dict) -> int | None:
        """The expert count config.json gives (None when it gives none)."""
        return next((config[k] for k in self.count_keys if config.get(k) is not None), None)

    # -- names ---------------------------------------------------------------------------------------------------
    def _re(self, layer_prefix: str) -> re.Pattern:
        m = re.escape(self.module)
        return re.compile(re.escape(layer_prefix) + rf"(?P<layer>\d+)\.{m}\.(?:(?P<e>\d+)\.(?P<lin>\w+)\.weight"
                                                    rf"|(?P<stacked>\w+)\.weight|(?P<fused>\w+))$")

    def locate(self, name: str, layer_prefix: str) -> tuple[int, str, int | None, str] | None:
        """(layer, layout, expert or None, linear or fused name) of an expert tensor; None for any other tensor.
        layout is "expert", "stacked" or "fused"."""
        m = self._re(layer_prefix).match(name)
        if m is None:
            return None
        layer = int(m["layer"])
        if m["e"] is not None:
            return (layer, "expert", int(m["e"]), m["lin"]) if m["lin"] in self.linears else None
        if m["stacked"] is not None:
            return (layer, "stacked", None, m["stacked"]) if m["stacked"] in self.linears else None
        return (layer, "fused", None, m["fused"]) if m["fused"] in dict(self.fused) else None

    def expert_name(self, layer_prefix: str, layer: int, e: int, linear: str) -> str:
        return f"{layer_prefix}{layer}.{self.module}.{e}.{linear}.weight"

    def stacked_name(self, layer_prefix: str, layer: int, linear: str) -> str:
        return f"{layer_prefix}{layer}.{self.module}.{linear}.weight"

    def fused_name(self, layer_prefix: str, layer: int, fused: str) -> str:
        return f"{layer_prefix}{layer}.{self.module}.{fused}"

    def is_router(self, name: str, layer_prefix: str) -> bool:
        return re.fullmatch(re.escape(layer_prefix) + r"\d+\." + re.escape(self.router), name) is not None

    # -- recipes -------------------------------------------------------------------------------------------------
    def _stacked_parts(self, layer_prefix: str, layer: int, linear: str, shapes: dict[str, tuple]):
        """How to build stacked ``linear`` of ``layer`` from ``shapes``'s names: (sources, shape, combine)."""
        per = []
        e = 0
        while (n := self.expert_name(layer_prefix, layer, e, linear)) in shapes:
            per.append(n)
            e += 1
        if per:
            return tuple(per), (len(per), *shapes[per[0]]), lambda ts: torch.stack(ts)
        stacked = self.stacked_name(layer_prefix, layer, linear)
        if stacked in shapes:
            return (stacked,), tuple(shapes[stacked]), lambda ts: ts[0]
        for fused, parts in self.fused:
            name = self.fused_name(layer_prefix, layer, fused)
            if linear in parts and name in shapes:
                shape = tuple(shapes[name])
                rows = shape[1] // len(parts)
                at = parts.index(linear) * rows
                return (name,), (shape[0], rows, *shape[2:]), lambda ts, a=at, r=rows: ts[0][:, a:a + r]
        return None

    def recipe(self, target: str, shapes: dict[str, tuple], layer_prefix: str) -> Recipe | None:
        """How to build the stacked or fused expert tensor ``target`` from the tensors of ``shapes`` (name -> shape),
        whatever their layout; None when ``target`` is no such tensor or they lack a part of it."""
        parsed = self.locate(target, layer_prefix)
        if parsed is None or parsed[1] == "expert":
            return None
        layer, layout, _, name = parsed
        linears = dict(self.fused)[name] if layout == "fused" else (name,)
        parts = [self._stacked_parts(layer_prefix, layer, lin, shapes) for lin in linears]
        if any(p is None for p in parts):
            return None
        if len(parts) == 1:
            sources, shape, combine = parts[0]
            return Recipe(sources, shape, combine, stack=len(sources) > 1)
        counts = [len(p[0]) for p in parts]
        shape = (parts[0][1][0], sum(p[1][1] for p in parts), *parts[0][1][2:])

        def combine(ts: list[torch.Tensor], parts=parts, counts=counts) -> torch.Tensor:
            out, at = [], 0
            for (_, _, fn), n in zip(parts, counts):
                out.append(fn(ts[at:at + n]))
                at += n
            return torch.cat(out, dim=1)

        sources = tuple(s for p in parts for s in p[0])
        return Recipe(tuple(dict.fromkeys(sources)), shape, _dedup(sources, combine))

    def pieces(self, name: str, shape: tuple[int, ...], layer_prefix: str) -> list[tuple] | None:
        """The index of each expert's linear in a fused or stacked tensor (``t[index]`` is one [out, in] weight), for
        merging expert by expert whatever the layout; None for any other tensor (a per-expert one is a piece)."""
        parsed = self.locate(name, layer_prefix)
        if parsed is None or parsed[1] == "expert" or len(shape) != 3:
            return None
        parts = dict(self.fused)[parsed[3]] if parsed[1] == "fused" else (parsed[3],)
        rows = shape[1] // len(parts)
        return [(e, slice(k * rows, (k + 1) * rows)) for e in range(shape[0]) for k in range(len(parts))]

    def as_stacked(self, names: Iterable[str], layer_prefix: str) -> list[str]:
        """``names`` in order with every expert tensor (any layout) replaced by the stacked tensors of its layer,
        in ``linears`` order, where that layer's first expert tensor was."""
        out: list[str] = []
        seen: set[int] = set()
        for name in names:
            parsed = self.locate(name, layer_prefix)
            if parsed is None:
                out.append(name)
            elif parsed[0] not in seen:
                seen.add(parsed[0])
                out += [self.stacked_name(layer_prefix, parsed[0], lin) for lin in self.linears]
        return out

    def check(self, config: dict, shapes: dict[str, tuple], layer_prefix: str, where: str) -> None:
        """One line when the weights' experts disagree with config.json's expert count or width."""
        count, ff = self.count(config), config.get(self.ff_key)
        key = next((k for k in self.count_keys if config.get(k) is not None), self.count_keys[0])
        for name in shapes:
            parsed = self.locate(name, layer_prefix)
            if parsed is None:
                continue
            layer = parsed[0]
            r = self.recipe(self.stacked_name(layer_prefix, layer, self.linears[0]), shapes, layer_prefix)
            if r is None:
                raise ModelError(f"{where}: layer {layer}'s experts are incomplete (no {self.linears[0]} for every "
                                 "expert); re-download the model")
            if count is not None and r.shape[0] != count:
                raise ModelError(f"{where}/config.json says {key} {count} but layer {layer} holds "
                                 f"{r.shape[0]} experts; restore it from the model's original config.json")
            if ff is not None and r.shape[1] != ff:
                raise ModelError(f"{where}/config.json says {self.ff_key} {ff} but layer {layer}'s experts are "
                                 f"{r.shape[1]} wide; restore it from the model's original config.json")
            return


def _dedup(sources: tuple[str, ...], combine):
    """A combine over ``sources`` (with repeats, e.g. one fused tensor read for two parts) reading each once."""
    unique = list(dict.fromkeys(sources))

    def run(ts: list[torch.Tensor]) -> torch.Tensor:
        by = dict(zip(unique, ts))
        return combine([by[s] for s in sources])

    return run
