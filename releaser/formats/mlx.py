"""MLX affine quantization (what ``mlx_lm.convert -q`` writes, rounded as MLX rounds) of an unquantized folder.

Per group of ``g`` consecutive input weights (mlx's ``affine_quantize``, float32 math on the weights' own values):
``scale = max((max - min) / (2^bits - 1), 1e-7)``, signed so that the edge of larger magnitude (``min`` when
``|min| > |max|``, else ``max``) is an exact code: ``q0 = rint(edge / scale)``; when ``q0 != 0``, ``scale = edge / q0``
and ``bias = edge``, else ``bias = 0``. Codes are ``clip(rint((w - bias) / scale), 0, 2^bits - 1)``; scale and bias
are stored in the weights' dtype, and a loader computes ``w = q * scale + bias``.

Layout, as mlx-lm's models name and load it: every ``.weight`` matrix whose width the group size divides (the
embedding, every linear, lm_head unless tied) becomes ``X.weight`` uint32 [out, in * bits / 32] (code i of a word at
bits ``i * bits``), ``X.scales`` and ``X.biases`` [out, in / g]; a mixture-of-experts router stays unquantized, the
experts of one layer are stacked as ``mlp.switch_mlp.{gate,up,down}_proj``. ``config.json`` gains ``quantization``
(and mlx-lm's copy ``quantization_config``): ``{"group_size", "bits", "mode": "affine"}``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ..atomic import output_dir
from ..checkpoint import CheckpointReader, CheckpointWriter, architecture_for
from ..checkpoint.config import check_unquantized, clean_config
from ..errors import ModelError
from ..stage import Reporter, StageResult, describe_files
from ..awq.pack import pack_rows, unpack_rows
from .common import copy_side_files
from .options import MLXOptions

EPS = 1e-7
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def affine_quantize(w: torch.Tensor, group_size: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w`` [..., K] (float16, bfloat16 or float32) -> codes uint8 [..., K], scales and biases [..., K / g] in
    ``w``'s dtype, as mlx's affine_quantize computes them."""
    *lead, k = w.shape
    n_bins = float((1 << bits) - 1)
    g = w.reshape(-1, k // group_size, group_size).to(torch.float32)
    w_max, w_min = g.amax(-1, keepdim=True), g.amin(-1, keepdim=True)
    mask = w_min.abs() > w_max.abs()
    scale = ((w_max - w_min) / n_bins).clamp(min=EPS)
    scale = torch.where(mask, scale, -scale)
    edge = torch.where(mask, w_min, w_max)
    q0 = torch.round(edge / scale)
    nonzero = q0 != 0
    scale = torch.where(nonzero, edge / torch.where(nonzero, q0, 1.0), scale)
    bias = torch.where(nonzero, edge, torch.zeros_like(edge))
    q = torch.round((g - bias) / scale).clamp_(0, n_bins)
    shape = (*lead, k // group_size)
    return (q.reshape(*lead, k).to(torch.uint8), scale.reshape(shape).to(w.dtype), bias.reshape(shape).to(w.dtype))


def dequantize_mlx(weight: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int,
                   group_size: int, exact: bool = True) -> torch.Tensor:
    """The weight of an MLX affine-quantized matrix, ``q * scale + bias``: float32 (``exact``, what mlx's quantized
    matmul kernels compute with), or in the scales' dtype with the product and the sum each rounded to it, as
    ``mx.dequantize`` returns it."""
    q = unpack_rows(weight, bits).to(torch.float32 if exact else scales.dtype)
    if q.shape[-1] != scales.shape[-1] * group_size or scales.shape != biases.shape \
            or q.shape[:-1] != scales.shape[:-1]:
        raise ModelError(f"MLX tensors of shapes weight {tuple(weight.shape)}, scales {tuple(scales.shape)}, biases "
                         f"{tuple(biases.shape)} do not fit {bits} bits and group size {group_size}")
    dtype = torch.float32 if exact else scales.dtype
    s = scales.to(dtype).repeat_interleave(group_size, -1)
    b = biases.to(dtype).repeat_interleave(group_size, -1)
    return q * s + b


def mlx_config(config: dict, bits: int, group_size: int) -> dict:
    q = {"group_size": group_size, "bits": bits, "mode": "affine"}
    return {**clean_config(config), "quantization": q, "quantization_config": dict(q)}


def _plan(reader: CheckpointReader, arch, config: dict, group_size: int, bits: int):
    """(specs, jobs): the output tensors, and per output name what it is made of — ("copy", source),
    ("quantize", [sources]) (one source, or the experts to stack)."""
    tied = bool(config.get("tie_word_embeddings", False))
    names = [n for n in reader.tensors if not n.endswith("rotary_emb.inv_freq")
             and not (tied and n == "lm_head.weight")]
    dtype_name = config.get("torch_dtype")   # mlx_lm.convert casts to it when the config names one
    cast = FLOAT_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    groups: dict[str, list[tuple[int, str]]] = {}
    x = arch.experts
    for name in names:
        out, e = name, 0
        if x is not None and (p := x.locate(name, arch.layer_prefix)) is not None:
            if p[1] != "expert":
                raise ModelError(f"{name} holds its layer's experts {p[1]}; MLX conversion reads one tensor per "
                                 "expert (mlp.experts.{e}.gate_proj.weight, as released checkpoints have them)")
            layer, _, e, linear = p
            out = f"{arch.layer_name(layer, x.module.rsplit('.', 1)[0])}.switch_mlp.{linear}.weight"
        groups.setdefault(out, []).append((e, name))
    groups = {out: [n for _, n in sorted(parts)] for out, parts in groups.items()}   # experts in order
    specs, jobs = [], {}
    for out, sources in groups.items():
        info = reader.tensors[sources[0]]
        dtype = cast if cast is not None and info.dtype.is_floating_point else info.dtype
        shape = tuple(info.shape) if len(sources) == 1 else (len(sources), *info.shape)
        router = arch.is_router(sources[0])
        if out.endswith(".weight") and len(shape) >= 2 and shape[-1] % group_size == 0 and not router \
                and info.dtype.is_floating_point:
            base = out.removesuffix(".weight")
            specs += [(out, torch.uint32, (*shape[:-1], shape[-1] * bits // 32)),
                      (base + ".scales", dtype, (*shape[:-1], shape[-1] // group_size)),
                      (base + ".biases", dtype, (*shape[:-1], shape[-1] // group_size))]
            jobs[out] = ("quantize", sources, dtype)
        else:
            specs.append((out, dtype, shape))
            jobs[out] = ("copy", sources, dtype)
    return specs, jobs


def quantize_folder(options: MLXOptions, model_dir: str | os.PathLike, out_dir: str | os.PathLike,
                    reporter: Reporter | None = None, *, overwrite: bool = False) -> StageResult:
    """Write the MLX folder ``out_dir`` of the unquantized folder ``model_dir``."""
    reporter = reporter or Reporter()
    model_dir, out = Path(model_dir), Path(out_dir)
    start = time.perf_counter()
    bits, g = options.bits, options.group_size
    with CheckpointReader(model_dir) as reader:
        config = reader.config
        check_unquantized(config, model_dir, "MLX")
        arch = architecture_for(config, str(model_dir))
        if arch.experts is not None:
            arch.experts.check(config, {n: tuple(i.shape) for n, i in reader.tensors.items()}, arch.layer_prefix,
                               str(model_dir))
        specs, jobs = _plan(reader, arch, config, g, bits)
        quantized = sum(1 for kind, *_ in jobs.values() if kind == "quantize")
        with output_dir(out, overwrite=overwrite) as tmp:
            staging = tmp / "weights"
            with CheckpointWriter(staging, specs, overwrite=True, metadata={"format": "mlx"}) as writer:
                with reporter.progress(f"MLX {bits}-bit g{g}", total=len(jobs)) as advance:
                    for name, (kind, sources, dtype) in jobs.items():
                        parts = [reader.read(s).to(dtype) for s in sources]
                        t = parts[0] if len(parts) == 1 else torch.stack(parts)
                        if kind == "copy":
                            writer.write(name, t.contiguous())
                        else:
                            codes, scales, biases = affine_quantize(t, g, bits)
                            base = name.removesuffix(".weight")
                            writer.write(name, pack_rows(codes, bits, unsigned=True))
                            writer.write(base + ".scales", scales.contiguous())
                            writer.write(base + ".biases", biases.contiguous())
                        advance()
                writer.commit()
            for f in staging.iterdir():
                os.replace(f, tmp / f.name)
            staging.rmdir()
            copy_side_files(model_dir, tmp)
            (tmp / "config.json").write_text(json.dumps(mlx_config(config, bits, g), indent=2) + "\n")
    seconds = time.perf_counter() - start
    facts = {"bits": bits, "group_size": g, "mode": "affine", "quantized": quantized}
    summary = f"MLX {bits}-bit g{g} of {model_dir.name}: {quantized} matrices quantized, {seconds:.1f} s -> {out}"
    return StageResult("mlx", out, describe_files(out), summary, {**facts, "seconds": round(seconds, 2)})


def run(options: MLXOptions, inputs: str | os.PathLike, out: str | os.PathLike, reporter: Reporter | None = None, *,
        overwrite: bool = False, describe=describe_files) -> StageResult:
    """The ``mlx`` stage: :func:`quantize_folder` of the main folder ``inputs`` into ``out``."""
    result = quantize_folder(options, inputs, out, reporter, overwrite=overwrite)
    return StageResult("mlx", Path(out), describe(Path(out)), result.summary, result.facts)
