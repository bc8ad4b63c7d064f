"""MLX affine quantization of an unquantized folder (rounded as ``mlx_lm.convert -q`` rounds) or of an AWQ GEMM folder
(its 4-bit codes and float16 scales kept, ``bias = -zero * scale`` rounded to float16, as mlx-lm's own AutoAWQ reader
computes it: the AWQ weights, no rounding of ours; the folder's norms carry AWQ's scales). Measured on SmolLM2-135M,
the AWQ source is far better (mean KLD 0.145 against 0.295 rounded by MLX, both with an 8-bit embedding and head).

The embedding and the output head (tied or not) are rounded to ``embedding_bits`` (8 by default; 16 keeps them in
float): ``mlx_lm.convert -q`` rounds them to ``bits``, which costs SmolLM2 most of its quality (mean KLD 0.425 against
0.295). Their bits and group size, when not the folder's, are per-layer entries of config.json's ``quantization``
(``{"model.embed_tokens": {"group_size", "bits", "mode"}}``), which mlx-lm reads.

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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import output_dir
from ..checkpoint import CheckpointReader, CheckpointWriter, architecture_for
from ..checkpoint.config import check_unquantized, clean_config
from ..errors import ConfigError, ModelError
from ..stage import Reporter, StageResult, describe_files
from ..awq.pack import PACK, pack_rows, unpack, unpack_rows
from ..awq.stage import CALIBRATION_FILE
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


def layer_quantization(quantization: dict, base: str) -> tuple[int, int]:
    """(bits, group_size) of the quantized matrix ``base`` (``model.embed_tokens``) under config.json's
    ``quantization``: its per-layer entry when it has one (as ``mlx_lm.convert`` writes mixed recipes), else the
    folder's."""
    q = quantization.get(base)
    q = q if isinstance(q, dict) else quantization
    return int(q["bits"]), int(q["group_size"])


def mlx_config(config: dict, bits: int, group_size: int, layers: dict[str, tuple[int, int]] | None = None) -> dict:
    """``config`` with mlx-lm's ``quantization`` (and its copy ``quantization_config``): the folder's bits and group
    size, and a per-layer entry (module path -> its own) for each quantized matrix ``layers`` names."""
    q: dict = {"group_size": group_size, "bits": bits, "mode": "affine"}
    for base, (b, g) in (layers or {}).items():
        q[base] = {"group_size": g, "bits": b, "mode": "affine"}
    rest = {k: v for k, v in clean_config(config).items() if k not in ("quantization", "quantization_config")}
    return {**rest, "quantization": q, "quantization_config": json.loads(json.dumps(q))}


def awq_to_mlx(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One AutoAWQ GEMM linear (qweight [K, N/8], qzeros [G, N/8], float16 scales [G, N]) as MLX affine 4-bit:
    weight uint32 [N, K/8], scales [N, G] (AWQ's) and biases ``-zero * scale`` [N, G] rounded to float16 (what
    mlx-lm's own AutoAWQ loader computes), so that ``q * scale + bias`` is AWQ's ``(q - zero) * scale``."""
    codes = unpack(qweight).t().contiguous()                                   # [N, K]
    s = scales.t().contiguous()
    biases = (-unpack(qzeros).t().to(torch.float32) * s.to(torch.float32)).to(s.dtype).contiguous()
    return pack_rows(codes, 4, unsigned=True), s, biases


@dataclass(frozen=True)
class _Tensor:
    """One output matrix or tensor: its source tensors (one, or the experts to stack), dtype and shape (the
    unquantized shape), how it is made ("copy", "round": MLX's rounding, "repack": an AWQ linear's codes) and, for
    the last two, its bits and group size."""
    sources: tuple[str, ...]
    dtype: torch.dtype
    shape: tuple[int, ...]
    kind: str
    bits: int = 0
    group_size: int = 0


def _source_tensors(reader: CheckpointReader, awq_group: int | None) -> dict[str, tuple[torch.dtype, tuple, bool]]:
    """name -> (dtype, unquantized shape, is an AWQ linear): an AWQ folder's linears under their ``.weight``
    names (qweight, qzeros and scales read as one), every other tensor as it is."""
    out = {}
    for name, info in reader.tensors.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        base, _, part = name.rpartition(".")
        if awq_group is not None and part in ("qweight", "qzeros", "scales") and base + ".qweight" in reader.tensors:
            if part == "qweight":
                for other in (".qzeros", ".scales"):
                    if base + other not in reader.tensors:
                        raise ModelError(f"{name} has no {base + other}; make the AWQ folder again with releaser awq")
                k, n8 = info.shape
                out[base + ".weight"] = (reader.tensors[base + ".scales"].dtype, (n8 * PACK, k), True)
            continue
        out[name] = (info.dtype, tuple(info.shape), False)
    return out


def _plan(reader: CheckpointReader, arch, config: dict, options: MLXOptions, awq_group: int | None):
    """(specs, tensors): the output tensors' (name, dtype, shape), and per output name a :class:`_Tensor`."""
    tied = bool(config.get("tie_word_embeddings", False))
    source = {n: v for n, v in _source_tensors(reader, awq_group).items() if not (tied and n == arch.lm_head)}
    dtype_name = config.get("torch_dtype")   # mlx_lm.convert casts to it when the config names one
    cast = FLOAT_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    groups: dict[str, list[tuple[int, str]]] = {}
    x = arch.experts
    for name in source:
        out, e = name, 0
        if x is not None and (p := x.locate(name, arch.layer_prefix)) is not None:
            if p[1] != "expert":
                raise ModelError(f"{name} holds its layer's experts {p[1]}; MLX conversion reads one tensor per "
                                 "expert (mlp.experts.{e}.gate_proj.weight, as released checkpoints have them)")
            layer, _, e, linear = p
            out = f"{arch.layer_name(layer, x.module.rsplit('.', 1)[0])}.switch_mlp.{linear}.weight"
        groups.setdefault(out, []).append((e, name))
    specs, tensors = [], {}
    for out, parts in groups.items():
        sources = tuple(n for _, n in sorted(parts))   # experts in order
        dtype, shape, awq = source[sources[0]]
        dtype = cast if cast is not None and dtype.is_floating_point else dtype
        shape = shape if len(sources) == 1 else (len(sources), *shape)
        embedding = arch.is_embedding(sources[0])
        bits = options.embedding_bits if embedding else options.bits
        g = options.group_size
        if awq:
            t = _Tensor(sources, dtype, shape, "repack", 4, awq_group)
        elif out.endswith(".weight") and len(shape) >= 2 and shape[-1] % g == 0 and not arch.is_router(sources[0]) \
                and dtype.is_floating_point and bits < 16 and (awq_group is None or embedding):
            t = _Tensor(sources, dtype, shape, "round", bits, g)
        else:
            t = _Tensor(sources, dtype, shape, "copy")
        tensors[out] = t
        if t.kind == "copy":
            specs.append((out, dtype, shape))
        else:
            base, lead, k = out.removesuffix(".weight"), shape[:-1], shape[-1]
            specs += [(out, torch.uint32, (*lead, k * t.bits // 32)),
                      (base + ".scales", dtype, (*lead, k // t.group_size)),
                      (base + ".biases", dtype, (*lead, k // t.group_size))]
    return specs, tensors


def _awq_group(config: dict, folder: Path, options: MLXOptions) -> int | None:
    """The AWQ folder's group size (None: ``folder`` is unquantized); anything else quantized is refused."""
    qc = config.get("quantization_config")
    if not (isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "awq"):
        check_unquantized(config, folder, "MLX")
        return None
    from ..awq.evaluate import awq_quantization

    g = int(awq_quantization(config, folder)["group_size"])
    if options.bits != 4:
        raise ConfigError(f"{folder} is a 4-bit AWQ folder and MLX {options.bits}-bit was asked for; use bits 4 "
                          "(its codes are repacked) or make MLX from the unquantized folder (mlx source rtn)")
    return g


def quantize_folder(options: MLXOptions, model_dir: str | os.PathLike, out_dir: str | os.PathLike,
                    reporter: Reporter | None = None, *, overwrite: bool = False) -> StageResult:
    """Write the MLX folder ``out_dir`` of ``model_dir``: an unquantized folder (rounded as MLX rounds), or an AWQ
    GEMM folder (its 4-bit codes, scales and zero points repacked, no rounding; its norms carry the AWQ scales; only
    what it keeps in float, the embedding and head, is rounded by MLX, to ``embedding_bits``)."""
    reporter = reporter or Reporter()
    model_dir, out = Path(model_dir), Path(out_dir)
    start = time.perf_counter()
    with CheckpointReader(model_dir) as reader:
        config = reader.config
        awq_group = _awq_group(config, model_dir, options)
        arch = architecture_for(config, str(model_dir))
        if arch.experts is not None and awq_group is None:
            arch.experts.check(config, {n: tuple(i.shape) for n, i in reader.tensors.items()}, arch.layer_prefix,
                               str(model_dir))
        specs, tensors = _plan(reader, arch, config, options, awq_group)
        bits, g = (4, awq_group) if awq_group is not None else (options.bits, options.group_size)
        layers = {name.removesuffix(".weight"): (t.bits, t.group_size) for name, t in tensors.items()
                  if t.kind != "copy" and (t.bits, t.group_size) != (bits, g)}
        quantized = sum(1 for t in tensors.values() if t.kind != "copy")
        source = "awq" if awq_group is not None else "rtn"
        with output_dir(out, overwrite=overwrite) as tmp:
            staging = tmp / "weights"
            with CheckpointWriter(staging, specs, overwrite=True, metadata={"format": "mlx"}) as writer:
                with reporter.progress(f"MLX {bits}-bit g{g}", total=len(tensors)) as advance:
                    for name, t in tensors.items():
                        base = name.removesuffix(".weight")
                        if t.kind == "repack":
                            parts = [awq_to_mlx(*(reader.read(s.removesuffix(".weight") + p)
                                                  for p in (".qweight", ".qzeros", ".scales"))) for s in t.sources]
                            packed, scales, biases = (p[0] if len(parts) == 1 else torch.stack(p)
                                                      for p in zip(*parts))
                            writer.write(name, packed)
                            writer.write(base + ".scales", scales.to(t.dtype))
                            writer.write(base + ".biases", biases.to(t.dtype))
                            advance()
                            continue
                        parts = [reader.read(s).to(t.dtype) for s in t.sources]
                        w = parts[0] if len(parts) == 1 else torch.stack(parts)
                        if t.kind == "copy":
                            writer.write(name, w.contiguous())
                        else:
                            codes, scales, biases = affine_quantize(w, t.group_size, t.bits)
                            writer.write(name, pack_rows(codes, t.bits, unsigned=True))
                            writer.write(base + ".scales", scales.contiguous())
                            writer.write(base + ".biases", biases.contiguous())
                        advance()
                writer.commit()
            for f in staging.iterdir():
                os.replace(f, tmp / f.name)
            staging.rmdir()
            copy_side_files(model_dir, tmp)
            if awq_group is not None and (model_dir / CALIBRATION_FILE).is_file():   # what the codes came from
                shutil.copyfile(model_dir / CALIBRATION_FILE, tmp / CALIBRATION_FILE)
            (tmp / "config.json").write_text(json.dumps(mlx_config(config, bits, g, layers), indent=2) + "\n")
    seconds = time.perf_counter() - start
    embedding = tensors.get(arch.embed)
    facts = {"bits": bits, "group_size": g, "mode": "affine", "source": source, "quantized": quantized,
             "embedding_bits": embedding.bits if embedding is not None and embedding.kind != "copy" else None}
    what = "AWQ codes repacked" if awq_group is not None else "rounded by MLX"
    summary = f"MLX {bits}-bit g{g} of {model_dir.name} ({what}): {quantized} matrices quantized, {seconds:.1f} s " \
              f"-> {out}"
    return StageResult("mlx", out, describe_files(out), summary, {**facts, "seconds": round(seconds, 2)})


def run(options: MLXOptions, inputs: str | os.PathLike, out: str | os.PathLike, reporter: Reporter | None = None, *,
        overwrite: bool = False, describe=describe_files) -> StageResult:
    """The ``mlx`` stage: :func:`quantize_folder` of the main folder ``inputs`` into ``out``."""
    result = quantize_folder(options, inputs, out, reporter, overwrite=overwrite)
    return StageResult("mlx", Path(out), describe(Path(out)), result.summary, result.facts)
