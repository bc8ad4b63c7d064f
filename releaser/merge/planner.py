"""Turn a merge config into a list of per-output-tensor jobs (which inputs, which evaluated parameters)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Architecture, CheckpointReader, architecture_for
from ..errors import ConfigError, ModelError
from . import hub
from .config import InputModel, InputSlice, LoraSource, MergeConfig, OutputSlice, evaluate, split_lora
from .lora import LoraAdapter, LoraReader
from .methods import REQUIRED, Method, Param
from .params import check_config, check_layer_gradients, lookup_method, settings, unused_filters
from .vocab import VocabAlignment, build_alignment, set_token_sources


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
    layer: int | None = None           # output layer index (None for embeddings, final norm, lm_head)
    seed: int | None = None            # per-tensor seed for random methods
    vocab: bool = False                # rows are tokens: align them with MergePlan.vocab first

    def input_bytes(self, plan: MergePlan) -> int:
        return sum(plan.readers[m].tensors[n].nbytes for m, n in self.sources)


@dataclass
class MergePlan:
    method: Method
    models: list[str]                  # model folders (a LoRA source is its base model's folder)
    readers: list[CheckpointReader]    # LoraReader for LoRA sources
    arch: Architecture
    jobs: list[TensorJob]
    out_config: dict
    donor: int                         # model whose tokenizer/generation files are copied
    vocab: VocabAlignment | None = None
    labels: list[str] = field(default_factory=list)     # models as the config names them (with their LoRA)
    warnings: list[str] = field(default_factory=list)   # things the user should know; the merge goes on
    folders: dict[str, CheckpointReader] = field(default_factory=dict)   # the open readers, one per folder

    def close(self) -> None:
        for r in self.folders.values():
            r.close()


def _dtype(name: str | None) -> torch.dtype | None:
    return getattr(torch, name) if name else None


def _coerce(value: Any, spec: Param, name: str, where: str) -> Any:
    """A parameter value as the method declares it (type and range); errors name the parameter and where it is set."""
    try:
        return spec.coerce(value)
    except ValueError as exc:
        raise ConfigError(f"parameter `{name}` for {where} {exc}") from None


def _seed(random_seed: int, name: str) -> int:
    import hashlib

    digest = hashlib.sha256(f"{random_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _ref_key(model: str, lora: LoraSource | None) -> tuple:
    return (os.path.abspath(model), os.path.abspath(lora.path) if lora else None, lora.weight if lora else None)


def _label(model: str, lora: LoraSource | None) -> str:
    if lora is None:
        return model
    return f"{model}+{lora.path}" + (f" (LoRA weight {lora.weight:g})" if lora.weight != 1 else "")


class _Planner:
    def __init__(self, config: MergeConfig):
        self.config = config
        self.method = lookup_method(config)
        self.models: list[str] = []
        self.labels: list[str] = []
        self.keys: list[tuple] = []
        self.readers: list[CheckpointReader] = []
        self.plain: dict[str, CheckpointReader] = {}   # one reader per folder, shared by its LoRA sources
        self.jobs: list[TensorJob] = []
        self.vocab: VocabAlignment | None = None
        try:
            base_model, base_lora = split_lora(config.base_model) if config.base_model else (None, None)
        except ValueError as exc:
            raise ConfigError(f"`base_model`: {exc}") from None
        self.base = (base_model, LoraSource(path=base_lora) if base_lora else None)

    def model(self, ref: str, lora: LoraSource | None = None) -> int:
        key = _ref_key(ref, lora)
        if key in self.keys:
            return self.keys.index(key)
        local = hub.resolve(ref)   # a local folder, or a Hub id's snapshot in the HF cache
        folder = os.path.abspath(local)
        reader = self.plain.get(folder)
        if reader is None:
            reader = self.plain[folder] = CheckpointReader(local)
        label = _label(ref, lora)
        if lora is not None:
            reader = LoraReader(reader, LoraAdapter(hub.resolve(lora.path, "adapter"), lora.weight), ref)
        self.models.append(local)
        self.labels.append(label)
        self.keys.append(key)
        self.readers.append(reader)
        return len(self.models) - 1

    def slice_base(self, s: OutputSlice) -> tuple[str | None, LoraSource | None]:
        if s.base_model:
            try:
                model, lora = split_lora(s.base_model)
            except ValueError as exc:
                raise ConfigError(f"`base_model` of a slice: {exc}") from None
            return model, LoraSource(path=lora) if lora else None
        return self.base

    def is_base(self, s: OutputSlice, src: InputSlice) -> bool:
        model, lora = self.slice_base(s)
        return model is not None and _ref_key(model, lora) == _ref_key(src.model, src.lora)

    def close(self) -> None:
        for r in self.plain.values():
            r.close()

    # -- normalisation ---------------------------------------------------------------------------
    def slices(self) -> list[tuple[OutputSlice, str]]:
        """Output slices with a YAML path prefix for errors; the models form becomes one slice over all layers."""
        cfg = self.config
        if cfg.slices:
            return [(s, f"slices[{i}]") for i, s in enumerate(cfg.slices)]
        sources = []
        entries = list(cfg.models)
        base_model, base_lora = self.base
        if base_model and _ref_key(base_model, base_lora) not in [_ref_key(m.model, m.lora) for m in entries]:
            entries.append(InputModel(model=base_model, lora=base_lora))
        for m in entries:
            reader = self.readers[self.model(m.model, m.lora)]
            n = self.num_layers(reader, m.model)
            sources.append(InputSlice(model=m.model, lora=m.lora, layer_range=(0, n), parameters=m.parameters))
        return [(OutputSlice(sources=sources), "models")]

    def num_layers(self, reader: CheckpointReader, ref: str) -> int:
        arch = architecture_for(reader.config, ref, stage="merge")
        try:
            return int(reader.config[arch.num_layers_key])
        except (KeyError, ValueError):
            raise ModelError(f"{ref}/config.json has no {arch.num_layers_key}") from None

    # -- parameters ------------------------------------------------------------------------------
    def resolve(self, specs: dict[str, Param], levels: list, name: str, t: float, layer: int | None, where: str,
                required: bool) -> dict[str, Any]:
        out = {}
        for pname, spec in specs.items():
            value = None
            for level in levels:
                if level and pname in level:
                    value = evaluate(level[pname], name, t, layer)
                    if value is not None:
                        break
            if value is not None:
                value = _coerce(value, spec, pname, where)
            if value is None:
                if spec.default is REQUIRED:
                    if required:
                        misplaced = [f"`{path}.{pname}`" for path, level, n, _ in settings(self.config)
                                     if n == pname and level == "model"]
                        fix = (f"{misplaced[0]} is set per model, where {self.method.name} does not read it: move it "
                               "to the top-level `parameters:`" if misplaced else "set it under `parameters:`")
                        raise ConfigError(f"merge_method {self.method.name} needs parameter `{pname}` for {where} "
                                          f"(tensor {name}); {fix}")
                    continue
                value = spec.default
            out[pname] = value
        return out

    # -- planning --------------------------------------------------------------------------------
    def plan(self) -> MergePlan:
        cfg = self.config
        self.warnings = check_config(cfg)
        slices = self.slices()
        for s, path in slices:
            for j, src in enumerate(s.sources):
                self.model(src.model, src.lora)
        archs = {architecture_for(r.config, m, stage="merge").name: m for r, m in zip(self.readers, self.models)}
        if len(archs) > 1:
            raise ModelError(f"cannot merge different architectures: {', '.join(f'{a} ({m})' for a, m in archs.items())}")
        self.arch = architecture_for(self.readers[0].config, self.models[0], stage="merge")

        total_layers = 0
        for s, path in slices:
            lengths = set()
            for j, src in enumerate(s.sources):
                n = self.num_layers(self.readers[self.model(src.model, src.lora)], src.model)
                start, end = src.layer_range
                if end > n:
                    where = f"{path}.sources[{j}].layer_range" if cfg.slices else path
                    raise ConfigError(f"`{where}` [{start}, {end}] is out of bounds: {src.model} has {n} layers "
                                      f"(valid ranges lie within [0, {n}])")
                lengths.add(end - start)
            if len(lengths) > 1:
                raise ConfigError(f"all sources of `{path}` must span the same number of layers, got {sorted(lengths)}")
            total_layers += lengths.pop()
            self.check_inputs(s, path)
        check_layer_gradients(cfg, total_layers)

        first, last = slices[0][0], slices[-1][0]
        if cfg.tokenizer_source or cfg.tokenizer:
            self.align_vocab(first)
        pre = [self.arch.embed]
        post = self.non_layer_names(last, exclude=set(pre))
        for name in pre:
            self.add_job(name, first, [name] * len(first.sources), t=0.0, layer=None, where=slices[0][1])
        layer_out, self.origin = 0, []   # per output layer: (reader index, source layer) of its slice's first source
        for s, path in slices:
            n = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
            first_reader = self.model(s.sources[0].model, s.sources[0].lora)
            for idx in range(n):
                t = idx / (n - 1) if n > 1 else 1.0
                src_layers = [src.layer_range[0] + idx for src in s.sources]
                self.origin.append((first_reader, src_layers[0]))
                for suffix in self.layer_suffixes(s.sources[0], src_layers[0]):
                    names = [self.arch.layer_name(layer, suffix) for layer in src_layers]
                    self.add_job(self.arch.layer_name(layer_out, suffix), s, names, t=t, layer=layer_out, where=path)
                layer_out += 1
        for name in post:
            self.add_job(name, last, [name] * len(last.sources), t=0.0, layer=None, where=slices[-1][1])
        return self.finish(layer_out, first, last)

    def align_vocab(self, first: OutputSlice) -> None:
        cfg = self.config
        settings = cfg.tokenizer
        source = cfg.tokenizer_source or settings.source
        if source not in ("base", "union"):
            model, lora = split_lora(source)
            if not Path(model).is_dir() and not hub.is_hub_ref(model):
                where = "tokenizer.source" if settings else "tokenizer_source"
                raise ConfigError(f"`{where}` {source} is neither base, union nor a model folder")
            source = self.models[self.model(model, LoraSource(path=lora) if lora else None)]
        tokens = (settings.tokens or {}) if settings else {}
        self.vocab = build_alignment(source, self.models, [r.config for r in self.readers], self.donor(first),
                                     add_tokens=list(tokens), pad_to_multiple_of=settings.pad_to_multiple_of
                                     if settings else None)

        def index(ref: str, where: str) -> int:
            model, lora = split_lora(ref)
            key = _ref_key(model, LoraSource(path=lora) if lora else None)
            if key not in self.keys:
                raise ConfigError(f"{where}: {ref} is not one of the merged models; use one of them")
            return self.keys.index(key)

        set_token_sources(self.vocab, tokens, index, lambda i: self.labels[i])

    def donor(self, first: OutputSlice) -> int:
        base_model, base_lora = self.base
        if base_model:
            return self.model(base_model, base_lora)
        return self.model(first.sources[0].model, first.sources[0].lora)

    def check_inputs(self, s: OutputSlice, path: str) -> None:
        m = self.method
        base = self.slice_base(s)[0]
        has_base = any(self.is_base(s, src) for src in s.sources)
        n = len(s.sources)
        if m.base == "required" and not base:
            raise ConfigError(f"merge_method {m.name} needs `base_model`; set it to one of the models")
        if m.base == "required" and not has_base:
            raise ConfigError(f"`base_model` {base} must be one of the models of `{path}` for {m.name}")
        if m.base == "forbidden" and has_base:
            raise ConfigError(f"merge_method {m.name} does not use a base model; remove `base_model`")
        extra = " (the base model counts, and is added when it is not listed)" if m.base != "forbidden" else ""
        if n < m.min_models or (m.max_models is not None and n > m.max_models):
            raise ConfigError(f"merge_method {m.name} takes {_count(m.min_models, m.max_models)} models{extra}; "
                              f"`{path}` has {n}")
        others = n - int(has_base and m.base != "ignored")
        low, high = m.min_others or 0, m.max_others
        if others < low or (high is not None and others > high):
            raise ConfigError(f"merge_method {m.name} takes {_count(low, high)} models besides the base model; "
                              f"`{path}` has {others}")

    def layer_suffixes(self, src: InputSlice, layer: int) -> list[str]:
        reader = self.readers[self.model(src.model, src.lora)]
        prefix = self.arch.layer_name(layer, "")
        return [k[len(prefix):] for k in reader.tensors if k.startswith(prefix)]

    def non_layer_names(self, s: OutputSlice, exclude: set[str]) -> list[str]:
        names: list[str] = []
        for src in s.sources:
            reader = self.readers[self.model(src.model, src.lora)]
            names += [k for k in reader.tensors if self.arch.layer_of(k) is None and k not in exclude]
        names = list(dict.fromkeys(names))
        return sorted(names, key=lambda k: (k == self.arch.lm_head, k))

    def add_job(self, out_name: str, s: OutputSlice, names: list[str], t: float, layer: int | None,
                where: str) -> None:
        cfg = self.config
        sources, shapes = [], []
        base_index = None
        model_params = []
        uses_base = self.method.base != "ignored"
        for j, (src, name) in enumerate(zip(s.sources, names)):
            mi = self.model(src.model, src.lora)
            reader = self.readers[mi]
            if name not in reader.tensors:
                if name == self.arch.lm_head and self.arch.tied(reader.config, reader.tensors):
                    name = self.arch.embed  # tied lm_head: the input embedding serves as the head
                else:
                    raise ModelError(f"{src.model} has no tensor {name}; are the models of the same architecture and size?")
            is_base = uses_base and self.is_base(s, src)
            if is_base:
                base_index = j
            sources.append((mi, name))
            shapes.append(tuple(reader.tensors[name].shape))
            model_params.append(self.resolve(self.method.model_specs, [src.parameters, s.parameters, cfg.parameters],
                                             name, t, layer, self.labels[mi],
                                             required=not is_base or self.method.base_model_params))
        vocab = self.vocab is not None and self.arch.is_embedding(out_name)
        if vocab:
            shapes = [(self.vocab.size, *shape[1:]) for shape in shapes]
        if len(set(shapes)) > 1:
            detail = ", ".join(f"{self.labels[mi]} {list(shape)}" for (mi, _), shape in zip(sources, shapes))
            vocab_only = len({shape[1:] for shape in shapes}) == 1  # only the number of token rows differs
            hint = ("; set tokenizer_source: base or union to align vocabularies"
                    if self.arch.is_embedding(out_name) and vocab_only and self.vocab is None
                    else "; the models differ in size (hidden size or layout), so they cannot be merged")
            raise ModelError(f"shape mismatch for {out_name}: {detail}{hint}")
        params = self.resolve(self.method.global_specs, [s.parameters, cfg.parameters], out_name, t, layer, where,
                              required=True)
        if self.method.validate is not None:
            problem = self.method.validate(params, model_params, base_index)
            if problem:
                raise ConfigError(f"merge_method {self.method.name}, tensor {out_name} (`{where}`): {problem}")
        compute = _dtype(cfg.dtype)
        if compute is None:  # like mergekit: the promoted dtype of the stored inputs
            stored = [self.readers[mi].tensors[n].dtype for mi, n in sources]
            compute = stored[0]
            for d in stored[1:]:
                compute = torch.promote_types(compute, d)
        dtype = _dtype(cfg.out_dtype) or compute
        seed = _seed(cfg.random_seed or 0, out_name) if self.method.random else None
        self.jobs.append(TensorJob(out_name, sources, base_index, params, model_params, shapes[0], dtype, compute,
                                   layer, seed, vocab))

    def finish(self, n_layers: int, first: OutputSlice, last: OutputSlice) -> MergePlan:
        cfg = self.config
        donor = self.donor(first)
        out_config = dict(self.readers[donor].config)
        out_config[self.arch.num_layers_key] = n_layers
        for key in self.arch.per_layer_config:   # one entry per layer (layer_types, no_rope_layers): follow the layers
            lists = [r.config.get(key) for r in self.readers]
            if all(isinstance(v, list) and len(v) == int(r.config[self.arch.num_layers_key])
                   for v, r in zip(lists, self.readers)):
                out_config[key] = [lists[m][j] for m, j in self.origin]
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
        tensor_names = names | {n for j in self.jobs for _, n in j.sources}
        warnings = self.warnings + unused_filters(cfg, tensor_names)
        return MergePlan(self.method, self.models, self.readers, self.arch, self.jobs, out_config, donor,
                         self.vocab, list(self.labels), warnings, self.plain)


def _count(low: int, high: int | None) -> str:
    if high == low:
        return str(low)
    return f"at least {low}" if high is None else f"{low} to {high}"


def plan_merge(config: MergeConfig) -> MergePlan:
    planner = _Planner(config)
    try:
        return planner.plan()
    except BaseException:
        planner.close()
        raise
