"""Turn a merge config into a list of per-output-tensor jobs (which inputs, which evaluated parameters)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Architecture, CheckpointReader, architecture_for
from ..errors import ConfigError, ModelError
from .config import InputSlice, MergeConfig, OutputSlice, evaluate
from .methods import REQUIRED, Method, get_method, method_names
from .vocab import VocabAlignment, build_alignment


@dataclass
class TensorJob:
    name: str                          # output tensor name
    sources: list[tuple[int, str]]     # (index into MergePlan.models, input tensor name)
    base_index: int | None             # position of the base model in ``sources``
    params: dict[str, Any]
    model_params: list[dict[str, Any]]
    shape: tuple[int, ...]
    dtype: torch.dtype                 # output dtype
    compute_dtype: torch.dtype         # inputs are cast to this before the method runs
    seed: int | None = None            # per-tensor seed for random methods
    vocab: bool = False                # rows are tokens: align them with MergePlan.vocab first

    def input_bytes(self, plan: MergePlan) -> int:
        return sum(plan.readers[m].tensors[n].nbytes for m, n in self.sources)


@dataclass
class MergePlan:
    method: Method
    models: list[str]
    readers: list[CheckpointReader]
    arch: Architecture
    jobs: list[TensorJob]
    out_config: dict
    donor: int                         # model whose tokenizer/generation files are copied
    vocab: VocabAlignment | None = None

    def close(self) -> None:
        for r in self.readers:
            r.close()


def _dtype(name: str | None) -> torch.dtype | None:
    return getattr(torch, name) if name else None


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce(value: Any, default: Any, name: str, where: str) -> bool | float:
    """Parameter values as mergekit validates them: booleans for boolean parameters, numbers for the rest."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if str(value).strip().lower() in _TRUE + _FALSE:
            return str(value).strip().lower() in _TRUE
    elif not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    kind = "true or false" if isinstance(default, bool) else "a number"
    raise ConfigError(f"parameter `{name}` for {where} must be {kind}, got {value!r}")


def _seed(random_seed: int, name: str) -> int:
    import hashlib

    digest = hashlib.sha256(f"{random_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class _Planner:
    def __init__(self, config: MergeConfig):
        self.config = config
        try:
            self.method = get_method(config.merge_method)
        except KeyError:
            raise ConfigError(f"unknown merge_method {config.merge_method!r} at `merge_method`; "
                              f"use one of {', '.join(method_names())}") from None
        self.models: list[str] = []
        self.readers: list[CheckpointReader] = []
        self.jobs: list[TensorJob] = []
        self.vocab: VocabAlignment | None = None

    def model(self, ref: str) -> int:
        key = os.path.abspath(ref)
        for i, m in enumerate(self.models):
            if os.path.abspath(m) == key:
                return i
        if not Path(ref).exists():
            raise ModelError(f"model {ref} not found: releaser merges local folders; check the path "
                             "(or download it first with `huggingface-cli download`)")
        reader = CheckpointReader(ref)
        self.models.append(ref)
        self.readers.append(reader)
        return len(self.models) - 1

    # -- normalisation ---------------------------------------------------------------------------
    def slices(self) -> list[tuple[OutputSlice, str]]:
        """Output slices with a YAML path prefix for errors; the models form becomes one slice over all layers."""
        cfg = self.config
        if cfg.slices:
            return [(s, f"slices[{i}]") for i, s in enumerate(cfg.slices)]
        sources = []
        refs = [m.model for m in cfg.models]
        entries = list(cfg.models)
        if cfg.base_model and os.path.abspath(cfg.base_model) not in map(os.path.abspath, refs):
            from .config import InputModel
            entries.append(InputModel(model=cfg.base_model))
        for m in entries:
            reader = self.readers[self.model(m.model)]
            n = self.num_layers(reader, m.model)
            sources.append(InputSlice(model=m.model, layer_range=(0, n), parameters=m.parameters))
        return [(OutputSlice(sources=sources), "models")]

    def num_layers(self, reader: CheckpointReader, ref: str) -> int:
        arch = architecture_for(reader.config, ref)
        try:
            return int(reader.config[arch.num_layers_key])
        except (KeyError, ValueError):
            raise ModelError(f"{ref}/config.json has no {arch.num_layers_key}") from None

    # -- parameters ------------------------------------------------------------------------------
    def resolve(self, spec: dict[str, Any], levels: list, name: str, t: float, where: str,
                required: bool) -> dict[str, Any]:
        out = {}
        for pname, default in spec.items():
            value = None
            for level in levels:
                if level and pname in level:
                    value = evaluate(level[pname], name, t)
                    if value is not None:
                        break
            if value is not None:
                value = _coerce(value, default, pname, where)
            if value is None:
                if default is REQUIRED:
                    if required:
                        raise ConfigError(f"merge_method {self.method.name} needs parameter `{pname}` for {where} "
                                          f"(tensor {name}); set it under `parameters:`")
                    continue
                value = default
            out[pname] = value
        return out

    # -- planning --------------------------------------------------------------------------------
    def plan(self) -> MergePlan:
        cfg = self.config
        slices = self.slices()
        for s, path in slices:
            for j, src in enumerate(s.sources):
                self.model(src.model)
        archs = {architecture_for(r.config, m).name: m for r, m in zip(self.readers, self.models)}
        if len(archs) > 1:
            raise ModelError(f"cannot merge different architectures: {', '.join(f'{a} ({m})' for a, m in archs.items())}")
        self.arch = architecture_for(self.readers[0].config, self.models[0])

        for s, path in slices:
            lengths = set()
            for j, src in enumerate(s.sources):
                n = self.num_layers(self.readers[self.model(src.model)], src.model)
                start, end = src.layer_range
                if end > n:
                    where = f"{path}.sources[{j}].layer_range" if cfg.slices else path
                    raise ConfigError(f"`{where}` [{start}, {end}] is out of bounds: {src.model} has {n} layers "
                                      f"(valid ranges lie within [0, {n}])")
                lengths.add(end - start)
            if len(lengths) > 1:
                raise ConfigError(f"all sources of `{path}` must span the same number of layers, got {sorted(lengths)}")
            self.check_inputs(s, path)

        first, last = slices[0][0], slices[-1][0]
        if cfg.tokenizer_source:
            donor = self.model(cfg.base_model) if cfg.base_model else self.model(first.sources[0].model)
            source = cfg.tokenizer_source
            if source not in ("base", "union") and Path(source).is_dir():
                source = self.models[self.model(source)]
            self.vocab = build_alignment(source, self.models, [r.config for r in self.readers], donor)
        pre = [self.arch.embed]
        post = self.non_layer_names(last, exclude=set(pre))
        for name in pre:
            self.add_job(name, first, [name] * len(first.sources), t=0.0, where=slices[0][1])
        layer_out = 0
        for s, path in slices:
            n = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
            for idx in range(n):
                t = idx / (n - 1) if n > 1 else 1.0
                src_layers = [src.layer_range[0] + idx for src in s.sources]
                for suffix in self.layer_suffixes(s.sources[0], src_layers[0]):
                    names = [self.arch.layer_name(layer, suffix) for layer in src_layers]
                    self.add_job(self.arch.layer_name(layer_out, suffix), s, names, t=t, where=path)
                layer_out += 1
        for name in post:
            self.add_job(name, last, [name] * len(last.sources), t=0.0, where=slices[-1][1])
        return self.finish(layer_out, first, last)

    def check_inputs(self, s: OutputSlice, path: str) -> None:
        m, cfg = self.method, self.config
        base = s.base_model or cfg.base_model
        refs = [os.path.abspath(src.model) for src in s.sources]
        n = len(refs)
        if m.base == "required" and not base:
            raise ConfigError(f"merge_method {m.name} needs `base_model`; set it to one of the models")
        if m.base == "required" and os.path.abspath(base) not in refs:
            raise ConfigError(f"`base_model` {base} must be one of the models of `{path}` for {m.name}")
        if n < m.min_models or (m.max_models is not None and n > m.max_models):
            want = str(m.min_models) if m.max_models == m.min_models else (
                f"at least {m.min_models}" if m.max_models is None else f"{m.min_models} to {m.max_models}")
            extra = " (the base model counts, and is added when it is not listed)" if m.base != "forbidden" else ""
            raise ConfigError(f"merge_method {m.name} takes {want} models{extra}; `{path}` has {n}")

    def layer_suffixes(self, src: InputSlice, layer: int) -> list[str]:
        reader = self.readers[self.model(src.model)]
        prefix = self.arch.layer_name(layer, "")
        return [k[len(prefix):] for k in reader.tensors if k.startswith(prefix)]

    def non_layer_names(self, s: OutputSlice, exclude: set[str]) -> list[str]:
        names: list[str] = []
        for src in s.sources:
            reader = self.readers[self.model(src.model)]
            names += [k for k in reader.tensors if self.arch.layer_of(k) is None and k not in exclude]
        names = list(dict.fromkeys(names))
        return sorted(names, key=lambda k: (k == self.arch.lm_head, k))

    def add_job(self, out_name: str, s: OutputSlice, names: list[str], t: float, where: str) -> None:
        cfg = self.config
        base = s.base_model or cfg.base_model
        sources, shapes = [], []
        base_index = None
        model_params = []
        for j, (src, name) in enumerate(zip(s.sources, names)):
            mi = self.model(src.model)
            reader = self.readers[mi]
            if name not in reader.tensors:
                if name == self.arch.lm_head and self.arch.tied(reader.config, reader.tensors):
                    name = self.arch.embed  # tied lm_head: the input embedding serves as the head
                else:
                    raise ModelError(f"{src.model} has no tensor {name}; are the models of the same architecture and size?")
            is_base = base is not None and os.path.abspath(src.model) == os.path.abspath(base)
            if is_base:
                base_index = j
            sources.append((mi, name))
            shapes.append(tuple(reader.tensors[name].shape))
            model_params.append(self.resolve(self.method.model_params, [src.parameters, s.parameters, cfg.parameters],
                                             name, t, f"{src.model}",
                                             required=not (is_base and self.method.base == "required")))
        vocab = self.vocab is not None and self.arch.is_embedding(out_name)
        if vocab:
            shapes = [(self.vocab.size, *shape[1:]) for shape in shapes]
        if len(set(shapes)) > 1:
            detail = ", ".join(f"{self.models[mi]} {list(shape)}" for (mi, _), shape in zip(sources, shapes))
            vocab_only = len({shape[1:] for shape in shapes}) == 1  # only the number of token rows differs
            hint = ("; set tokenizer_source: base or union to align vocabularies"
                    if self.arch.is_embedding(out_name) and vocab_only and self.vocab is None
                    else "; the models differ in size (hidden size or layout), so they cannot be merged")
            raise ModelError(f"shape mismatch for {out_name}: {detail}{hint}")
        params = self.resolve(self.method.global_params, [s.parameters, cfg.parameters], out_name, t, where, required=True)
        compute = _dtype(cfg.dtype)
        if compute is None:  # like mergekit: the promoted dtype of the stored inputs
            stored = [self.readers[mi].tensors[n].dtype for mi, n in sources]
            compute = stored[0]
            for d in stored[1:]:
                compute = torch.promote_types(compute, d)
        dtype = _dtype(cfg.out_dtype) or compute
        seed = _seed(cfg.random_seed or 0, out_name) if self.method.random else None
        self.jobs.append(TensorJob(out_name, sources, base_index, params, model_params, shapes[0], dtype, compute,
                                   seed, vocab))

    def finish(self, n_layers: int, first: OutputSlice, last: OutputSlice) -> MergePlan:
        cfg = self.config
        donor = self.model(cfg.base_model) if cfg.base_model else self.model(first.sources[0].model)
        out_config = dict(self.readers[donor].config)
        out_config[self.arch.num_layers_key] = n_layers
        dtype_name = cfg.out_dtype or cfg.dtype
        if dtype_name:
            keys = [k for k in ("dtype", "torch_dtype") if k in out_config] or ["dtype"]
            for k in keys:
                out_config[k] = dtype_name
        names = {j.name for j in self.jobs}
        embed = next(j for j in self.jobs if j.name == self.arch.embed)
        out_config["vocab_size"] = embed.shape[0]
        if "tie_word_embeddings" in out_config or self.arch.lm_head in names:
            out_config["tie_word_embeddings"] = self.arch.lm_head not in names
        return MergePlan(self.method, self.models, self.readers, self.arch, self.jobs, out_config, donor,
                         self.vocab)


def plan_merge(config: MergeConfig) -> MergePlan:
    planner = _Planner(config)
    try:
        return planner.plan()
    except BaseException:
        for r in planner.readers:
            r.close()
        raise
