"""Torch models built from an artefact's own bytes: every GGUF tensor dequantized with gguf-py (names mapped back to
Hugging Face names, llama.cpp's Q/K row permutation undone for Llama), or every AWQ GEMM linear unpacked to float
weights. The architecture is transformers' own (LlamaForCausalLM, ...), run in float32: whole (``build``, for
generation) or streamed (``streamed``: each decoder layer's weights read just before it runs and dropped after)."""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import CheckpointReader, architecture_for, read_config
from ..errors import ModelError
from ..gguf.reader import GGUFFile

SPLIT = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")


@dataclass(frozen=True)
class Artefact:
    path: Path      # the .gguf file (first part of a split set) or the AWQ, W4A16 or MLX folder
    kind: str       # "gguf" | "awq" | "w4a16" | "mlx" | "rtn" (the unquantized folder ``path`` rounded to nearest,
    #                 AWQ's baseline)
    quant: str      # GGUF file type (Q4_K_M, F16, ...), "AWQ", "W4A16", "MLX-4bit" (bits), "RTN"
    label: str      # what tables show: the file or folder name
    group_size: int = 0   # "rtn": the group size

    @property
    def parts(self) -> list[Path]:
        """All files of a GGUF (the shards of a split set, in order)."""
        m = SPLIT.match(self.path.name)
        if self.kind != "gguf" or not m:
            return [self.path]
        n = int(m["n"])
        parts = [self.path.with_name(f"{m['stem']}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
        missing = [p.name for p in parts if not p.is_file()]
        if missing:
            raise ModelError(f"{self.path} is part of a split GGUF but {missing[0]} is missing")
        return parts


def folder_kind(config: dict) -> tuple[str, str] | None:
    """(kind, quant) of a quantized Hugging Face folder's config.json: AutoAWQ GEMM, compressed-tensors
    pack-quantized W4A16, MLX affine; None for anything else."""
    qc = config.get("quantization_config")
    method = str(qc.get("quant_method", "")).lower() if isinstance(qc, dict) else ""
    if method == "awq":
        return "awq", "AWQ"
    if method == "compressed-tensors" and qc.get("format") == "pack-quantized":
        return "w4a16", "W4A16"
    mlx = config.get("quantization")
    if isinstance(mlx, dict) and mlx.get("mode", "affine") == "affine" and {"bits", "group_size"} <= set(mlx):
        return "mlx", f"MLX-{mlx['bits']}bit"
    return None


def identify(path: str | os.PathLike | Artefact) -> Artefact:
    """What an artefact path is: a GGUF file (with its file type) or an AWQ, W4A16 or MLX folder."""
    import gguf

    if isinstance(path, Artefact):
        return path
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        ftype = GGUFFile(path).values.get("general.file_type")
        if ftype is None:
            raise ModelError(f"{path} has no general.file_type; re-export it with releaser gguf")
        try:
            quant = gguf.LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            raise ModelError(f"{path} has an unknown general.file_type {ftype}") from None
        return Artefact(path, "gguf", quant, path.name)
    if path.is_dir():
        kind = folder_kind(read_config(path))
        if kind is not None:
            return Artefact(path, kind[0], kind[1], path.name)
        raise ModelError(f"{path} is not a quantized folder releaser reads (config.json has no AWQ, compressed-tensors "
                         "pack-quantized or MLX quantization); evaluate GGUF files or AWQ, W4A16 or MLX folders")
    if not path.exists():
        raise ModelError(f"artefact {path} does not exist")
    raise ModelError(f"{path} is neither a .gguf file nor a quantized model folder")


# ---------------------------------------------------------------------------------------------------- weights


class Weights(ABC):
    """A model's weights as float32 tensors under Hugging Face names, read on demand: ``names`` lists them (cheap, no
    tensor data read), ``load(names)`` reads, dequantizes or converts the asked ones, one at a time."""

    config: dict
    path: Path
    names: list[str]

    @abstractmethod
    def load(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, float32 tensor) for each of ``names``, in order."""

    @abstractmethod
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """name -> shape of every tensor of ``names`` (read from headers, no tensor data)."""

    def types(self) -> dict[str, str]:
        """name -> ggml type name (Q4_K, F16, ...) of the tensors stored in a GGUF; none for float weights."""
        return {}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FolderWeights(Weights):
    """A Hugging Face model folder (safetensors or .bin), converted to float32."""

    def __init__(self, folder: Path):
        self.reader = CheckpointReader(folder)
        self.config, self.path = self.reader.config, Path(folder)
        architecture_for(self.config, str(folder), stage="quality")
        self.names = list(self.reader.tensors)

    def load(self, names):
        for name in names:
            yield name, self.reader.read(name).to(torch.float32)

    def shapes(self):
        return {n: tuple(self.reader.tensors[n].shape) for n in self.names}

    def close(self):
        self.reader.close()


class GGUFWeights(Weights):
    """Every tensor of a GGUF file (all parts of a split set) dequantized with gguf-py under its Hugging Face name,
    the family's GGUF transforms undone (``Architecture.from_gguf``). The GGUF carries no config of its own here:
    ``config`` is the unquantized model's."""

    def __init__(self, artefact: Artefact, config: dict):
        import gguf

        family = architecture_for(config, stage="quality")
        self.family, self.arch = family, family.gguf_arch
        self.config, self.path = config, artefact.path
        table = gguf.get_tensor_name_map(self.arch, config["num_hidden_layers"])
        names = _hf_tensor_names(config)
        if family.experts is not None:   # ffn_*_exps: one layer's experts of one linear, stacked
            names = family.experts.as_stacked(names, family.layer_prefix)
        hf_names = {table.get_name(hf, try_suffixes=(".weight", ".bias")): hf for hf in names}
        self._where: dict[str, tuple[GGUFFile, str]] = {}
        for part in artefact.parts:
            reader = GGUFFile(part)
            got = reader.values.get("general.architecture")
            if got is not None and got != gguf.MODEL_ARCH_NAMES[self.arch]:
                raise ModelError(f"{part} is a {got} GGUF, the model is {gguf.MODEL_ARCH_NAMES[self.arch]}")
            for name in reader.tensors:
                if name == "rope_freqs.weight":
                    continue  # llama3 RoPE factors: transformers computes them from the config
                hf = hf_names.get(name)
                if hf is None:
                    raise ModelError(f"{part} has a tensor {name} that {family.classes[0]} does not have")
                self._where[hf] = (reader, name)
        self.names = list(self._where)

    def load(self, names):
        for hf in names:
            reader, name = self._where[hf]
            data = self.family.from_gguf(hf, reader.dequantize(name), self.config)
            yield hf, torch.from_numpy(np.ascontiguousarray(data))

    def shapes(self):
        return {hf: tuple(reader.tensors[name].shape) for hf, (reader, name) in self._where.items()}

    def types(self):
        import gguf

        return {hf: gguf.GGMLQuantizationType(reader.tensors[name].ggml_type).name
                for hf, (reader, name) in self._where.items()}


def _hf_tensor_names(config: dict) -> list[str]:
    with torch.device("meta"):
        return list(skeleton(config).state_dict())


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int,
                   group_size: int) -> torch.Tensor:
    """A GEMM linear's float32 weight [out, in] (releaser.awq.pack's unpacking), after checking the shapes fit."""
    from ..awq.pack import dequantize

    if bits != 4:
        raise ModelError(f"AWQ with {bits} bits is not supported (GEMM checkpoints are 4-bit)")
    if qweight.shape[0] != qzeros.shape[0] * group_size or scales.shape != (qzeros.shape[0], qweight.shape[1] * 8) \
            or qzeros.shape[1] != qweight.shape[1]:
        raise ModelError(f"AWQ tensors of shapes qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                         f"scales {tuple(scales.shape)} do not fit group size {group_size}")
    return dequantize(qweight, qzeros, scales, group_size)


class AWQWeights(FolderWeights):
    """An AWQ GEMM folder: each quantized linear unpacked to its float32 weight, the other tensors converted."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        qc = self.config["quantization_config"]
        if str(qc.get("version", "gemm")).lower() != "gemm":
            raise ModelError(f"{folder}: AWQ version {qc.get('version')} is not supported; only GEMM")
        self.bits = int(qc.get("bits", qc.get("w_bit", 4)))
        self.group_size = int(qc.get("group_size", qc.get("q_group_size", 128)))
        self.names = []
        for name in self.reader.tensors:
            if name.endswith(".qweight"):
                prefix = name.removesuffix(".qweight")
                for part in (".qzeros", ".scales"):
                    if prefix + part not in self.reader:
                        raise ModelError(f"{folder} has {name} but no {prefix + part}")
                self.names.append(prefix + ".weight")
            elif not name.endswith((".qzeros", ".scales")):
                self.names.append(name)

    def load(self, names):
        for name in names:
            prefix = name.removesuffix(".weight")
            if prefix + ".qweight" in self.reader:
                read = self.reader.read
                yield name, dequantize_awq(read(prefix + ".qweight"), read(prefix + ".qzeros"),
                                           read(prefix + ".scales"), self.bits, self.group_size)
            else:
                yield name, self.reader.read(name).to(torch.float32)

    def shapes(self):
        out = {}
        for name in self.names:
            prefix = name.removesuffix(".weight")
            if prefix + ".qweight" in self.reader:   # qweight [in, out / 8] of a weight [out, in]
                k, n = self.reader.tensors[prefix + ".qweight"].shape
                out[name] = (n * 32 // self.bits, k)
            else:
                out[name] = tuple(self.reader.tensors[name].shape)
        return out


class W4A16Weights(FolderWeights):
    """A compressed-tensors pack-quantized folder: each ``weight_packed`` linear dequantized (releaser.formats.w4a16),
    the other tensors converted."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        qc = self.config["quantization_config"]
        groups = list((qc.get("config_groups") or {}).values())
        weights = [g.get("weights") or {} for g in groups]
        if len(weights) != 1 or weights[0].get("num_bits") != 4 or weights[0].get("type") != "int" \
                or weights[0].get("strategy") != "group":
            raise ModelError(f"{folder}: only one config group of 4-bit int group-wise weights is supported")
        self.group_size = int(weights[0]["group_size"])
        self.symmetric = bool(weights[0].get("symmetric", True))
        parts = (".weight_scale", ".weight_shape", ".weight_zero_point")
        self.names = []
        for name in self.reader.tensors:
            if name.endswith(".weight_packed"):
                self.names.append(name.removesuffix("_packed"))
            elif not name.endswith(parts):
                self.names.append(name)

    def load(self, names):
        from ..formats.w4a16 import dequantize_w4a16

        read = self.reader.read
        for name in names:
            base = name.removesuffix(".weight")
            if base + ".weight_packed" in self.reader:
                zp = None if self.symmetric else read(base + ".weight_zero_point")
                yield name, dequantize_w4a16(read(base + ".weight_packed"), read(base + ".weight_scale"),
                                             read(base + ".weight_shape").tolist(), zp, self.group_size)
            else:
                yield name, read(name).to(torch.float32)

    def shapes(self):
        out = {}
        for name in self.names:
            base = name.removesuffix(".weight")
            if base + ".weight_packed" in self.reader:
                out[name] = tuple(int(x) for x in self.reader.read(base + ".weight_shape").tolist())
            else:
                out[name] = tuple(self.reader.tensors[name].shape)
        return out


class MLXWeights(FolderWeights):
    """An MLX affine folder: each quantized matrix (``.weight`` beside ``.scales`` and ``.biases``) dequantized in
    float32 (releaser.formats.mlx), the other tensors converted; stacked experts (``switch_mlp``) under the stacked
    expert names (``mlp.experts.{linear}.weight``)."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        self.quantization = self.config["quantization"]
        family = architecture_for(self.config)
        self._source: dict[str, str] = {}
        for name in self.reader.tensors:
            if name.endswith((".scales", ".biases")):
                continue
            hf = name
            if family.experts is not None and ".switch_mlp." in name:
                hf = name.replace(".switch_mlp.", "." + family.experts.module.rsplit(".", 1)[-1] + ".")
            self._source[hf] = name
        self.names = list(self._source)

    def _layer(self, base: str) -> tuple[int, int]:
        from ..formats.mlx import layer_quantization

        return layer_quantization(self.quantization, base)

    def load(self, names):
        from ..formats.mlx import dequantize_mlx

        read = self.reader.read
        for name in names:
            src = self._source[name]
            base = src.removesuffix(".weight")
            if base + ".scales" in self.reader:
                yield name, dequantize_mlx(read(src), read(base + ".scales"), read(base + ".biases"),
                                           *self._layer(base))
            else:
                yield name, read(src).to(torch.float32)

    def shapes(self):
        out = {}
        for name, src in self._source.items():
            shape = tuple(self.reader.tensors[src].shape)
            base = src.removesuffix(".weight")
            if base + ".scales" in self.reader:
                shape = (*shape[:-1], shape[-1] * 32 // self._layer(base)[0])
            out[name] = shape
        return out


class RTNWeights(FolderWeights):
    """An unquantized folder as an AWQ folder of it would be without AWQ's search: every linear AWQ quantizes rounded
    to nearest (4-bit groups with zero points and float16 scales, no scaling or clipping: ``releaser.awq.quantize``),
    the other tensors in float16 as AWQ stores them. The baseline AWQ is measured against. Fused and stacked expert
    tensors are rounded along their last (input) dimension, as per expert."""

    def __init__(self, folder: Path, group_size: int):
        super().__init__(folder)
        self.group_size = group_size
        self.family = architecture_for(self.config)
        block = re.compile(re.escape(self.family.layer_prefix) + r"\d+\.(.+)\.weight$")
        linears = set(self.family.awq_linears)
        shapes = self.shapes()
        self.rounded = {n for n in self.names if len(shapes[n]) >= 2 and (m := block.match(n))
                        and not self.family.is_router(n) and (m[1] in linears or self.family.is_expert(n))}

    def load(self, names):
        from ..awq.quantize import quantize

        for name, value in super().load(names):
            if name in self.rounded:
                value = quantize(value.reshape(-1, value.shape[-1]), self.group_size).dequantize().view(value.shape)
            else:
                value = value.to(torch.float16).to(torch.float32)
            yield name, value


def open_weights(artefact: Artefact | Path, base_config: dict | None = None) -> Weights:
    """The weights of an unquantized model folder (a Path), a GGUF (read with the unquantized model's config), an
    AWQ, W4A16 or MLX folder (with its own) or the round-to-nearest baseline of a folder."""
    if not isinstance(artefact, Artefact):
        return FolderWeights(Path(artefact))
    if artefact.kind == "gguf":
        return GGUFWeights(artefact, base_config)
    if artefact.kind == "rtn":
        return RTNWeights(artefact.path, artefact.group_size)
    return {"awq": AWQWeights, "w4a16": W4A16Weights, "mlx": MLXWeights}[artefact.kind](artefact.path)


# ---------------------------------------------------------------------------------------------------- models


def skeleton(config: dict):
    """An uninitialised float32 transformers model of ``config``'s architecture (weights are assigned after; pages
    never written are never resident)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    architecture_for(config, stage="quality")  # refuse what releaser does not support, with its message
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    hf_config = AutoConfig.for_model(**config)
    with no_init_weights():
        return AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)


class _Composed(Weights):
    """``inner`` with the expert tensors the model wants built from the layout ``inner`` has (per expert, stacked or
    fused; see ``releaser.arch.experts``): one tensor of one layer at a time, its sources read just for it."""

    def __init__(self, inner: Weights, wanted: Iterable[str]):
        family = architecture_for(inner.config)
        self.inner, self.config, self.path = inner, inner.config, inner.path
        have = set(inner.names)
        shapes = inner.shapes()
        self.recipes = {}
        for name in wanted:
            if name not in have and (r := family.experts.recipe(name, shapes, family.layer_prefix)) is not None:
                self.recipes[name] = r
        used = {n for r in self.recipes.values() for n in r.sources}
        self.names = [n for n in inner.names if n not in used] + list(self.recipes)

    def shapes(self):
        inner = self.inner.shapes()
        return {n: self.recipes[n].shape if n in self.recipes else inner[n] for n in self.names}

    def types(self):
        """A built tensor's type is its sources': one type when they agree, else (a concatenation of differently
        typed parts, e.g. gate and up) the parts' types joined by "+", in order."""
        inner = self.inner.types()
        out = {n: t for n, t in inner.items() if n in self.names}
        for name, recipe in self.recipes.items():
            parts = [inner[s] for s in recipe.sources if s in inner]
            if parts and len(parts) == len(recipe.sources):
                out[name] = parts[0] if len(set(parts)) == 1 or recipe.stack else "+".join(parts)
        return out

    def load(self, names):
        for name in names:
            recipe = self.recipes.get(name)
            if recipe is None:
                yield from self.inner.load([name])
            else:
                yield name, recipe.build(lambda n: next(iter(self.inner.load([n])))[1])


def _fit(model, weights: Weights) -> Weights:
    """``weights`` under the names of ``model``'s parameters where a family's experts come in another layout."""
    if architecture_for(weights.config).experts is None:
        return weights
    return _Composed(weights, [n for n, _ in model.named_parameters()])


def weight_types(model, weights: Weights) -> dict[str, str]:
    """ggml type of each of ``model``'s parameters that ``weights`` stores in a GGUF (see ``Weights.types``)."""
    return _fit(model, weights).types()


def _check_names(model, weights: Weights) -> dict[str, torch.nn.Parameter]:
    """The model's parameters, after checking that ``weights`` has a tensor for each (lm_head may be tied to the
    embedding) and none the model lacks."""
    params = dict(model.named_parameters())
    for name in weights.names:
        if name not in params and not name.endswith("rotary_emb.inv_freq"):
            raise ModelError(f"{weights.path} has a tensor {name} that {type(model).__name__} does not have; is it a "
                             "file of this model?")
    have = set(weights.names) | {"lm_head.weight"}
    missing = [k for k in params if k not in have]
    if missing:
        raise ModelError(f"{weights.path} has no tensor for {missing[0]} ({len(missing)} missing); is it a file of "
                         "this model?")
    return params


def _assign(params: dict, name: str, value: torch.Tensor, source: Path, shape: tuple | None = None) -> None:
    param = params[name]
    shape = tuple(param.shape) if shape is None else shape
    if tuple(value.shape) != shape:
        raise ModelError(f"{source}: {name} has shape {tuple(value.shape)}, the model needs {shape}; is it a file of "
                         "this model?")
    param.data = value


def _tie(model, weights: Weights) -> None:
    if "lm_head.weight" in dict(model.named_parameters()) and "lm_head.weight" not in weights.names:
        model.lm_head.weight = model.get_input_embeddings().weight


def build(weights: Weights):
    """The whole model of ``weights`` in memory (for generation); lm_head shares the embedding when the source has
    none (tied weights)."""
    model = skeleton(weights.config)
    weights = _fit(model, weights)
    params = _check_names(model, weights)
    for name, value in weights.load(n for n in weights.names if n in params):
        _assign(params, name, value, weights.path)
    _tie(model, weights)
    return model.eval()


LAYER = re.compile(r"^(?P<stack>.+\.layers)\.(?P<i>\d+)\.")


def streamed(weights: Weights, advance: Callable[[], None] = lambda: None):
    """The model of ``weights`` with only the tensors outside the decoder layers in memory: each layer's weights are
    read (dequantized) just before it runs and dropped after (then ``advance()`` is called), so a forward pass holds
    one layer at a time. Made for one forward pass over many windows at once (each pass reads every layer again)."""
    model = skeleton(weights.config)
    weights = _fit(model, weights)
    params = _check_names(model, weights)
    layers: dict[int, list[str]] = {}
    resident = []
    for name in params:
        m = LAYER.match(name)
        (layers.setdefault(int(m["i"]), []) if m else resident).append(name)
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    empty = torch.empty(0)
    for names in layers.values():
        for name in names:
            params[name].data = empty   # free the (never written) storage of the skeleton
    for name, value in weights.load(n for n in resident if n in weights.names):
        _assign(params, name, value, weights.path)
    _tie(model, weights)
    stack = model.get_submodule(LAYER.match(next(iter(layers.values()))[0])["stack"]) if layers else []
    for i, layer in enumerate(stack):
        names = layers.get(i, [])

        def before(module, args, names=names):
            for name, value in weights.load(names):
                _assign(params, name, value, weights.path, shapes[name])

        def after(module, args, output, names=names):
            for name in names:
                params[name].data = empty
            advance()

        layer.register_forward_pre_hook(before)
        layer.register_forward_hook(after)
    return model.eval()


def load(source: Artefact | Path, base_config: dict | None = None):
    """The torch model of ``source`` (see :func:`open_weights`), whole, in float32."""
    with open_weights(source, base_config) as weights:
        return build(weights)


BATCH_TOKENS = 4096


def forward_passes(windows: int, ctx: int) -> int:
    """How many forward passes :func:`scored_logits` makes for ``windows`` windows of ``ctx`` tokens."""
    per_batch = max(1, BATCH_TOKENS // ctx)
    return -(-windows // per_batch)


def scored_logits(model, first: int, lm_head_bytes: int = 48 << 20, rows: int = 64):
    """``run(tokens [n, ctx])``: per window, the model's logits at positions first..ctx-2 in blocks of ``rows`` rows.
    The lm_head runs only on those positions, on as many rows at a time as fit ``lm_head_bytes`` of logits (fewer
    passes over its weight); the blocks handed out are views of that, so what the caller makes of each (softmax,
    KLD temporaries) stays small for a 100k+ vocabulary. Windows run in batches of about ``BATCH_TOKENS`` tokens: one
    forward pass per batch (a streamed model reads its layers once per batch)."""
    head_rows = max(rows, lm_head_bytes // (4 * model.lm_head.out_features))

    def run(tokens: torch.Tensor):
        per_batch = max(1, BATCH_TOKENS // tokens.shape[1])
        for at in range(0, tokens.shape[0], per_batch):
            with torch.no_grad():
                hidden = model.model(tokens[at: at + per_batch], use_cache=False).last_hidden_state[:, first:-1]
            for window in hidden:
                yield _blocks(model, window, head_rows, rows, getattr(model.config, "final_logit_softcapping", None))
            del hidden

    return run


def _blocks(model, hidden: torch.Tensor, head_rows: int, rows: int, softcap: float | None = None):
    """The lm_head's logits (softcapped ``cap * tanh(logits / cap)`` as the model does, Gemma) in blocks of rows."""
    for part in hidden.split(head_rows):
        with torch.no_grad():
            logits = model.lm_head(part).float()
            if softcap:
                logits = torch.tanh(logits.div_(softcap)).mul_(softcap)
        yield from logits.split(rows)
        del logits
