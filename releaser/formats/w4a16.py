"""compressed-tensors ``pack-quantized`` W4A16 from an AutoAWQ GEMM folder: the same 4-bit codes, zero points and
float16 scales, laid out as compressed-tensors 0.20 reads them (llm-compressor's output format, which vLLM, SGLang and
transformers with ``compressed-tensors`` load).

Per quantized linear of weight [N, K] with group size g (G = K / g groups per row):

- ``weight_packed`` int32 [N, K/8]: row n's codes in order, eight per word, code i of a word at bits 4i. The codes
  are stored unsigned, ``q + 8`` of compressed-tensors' signed ``q`` in -8..7, which is the AWQ code itself;
- ``weight_scale`` float16 [N, G]; ``weight_shape`` int64 [2] = (N, K);
- ``weight_zero_point`` int32 [N/8, G]: the zero points (AWQ's, 0..15, likewise stored as ``zp + 8``) packed along
  the output dimension.

compressed-tensors dequantizes ``(q - zp) * scale`` = ``(code - zero) * scale``: AWQ's own weight, bit for bit in
float16. Every other tensor (embeddings, norms, lm_head, MoE routers) is copied as the AWQ folder has it (float16).
"""

from __future__ import annotations

import json
import shutil
import os
import time
from pathlib import Path

import torch

from ..atomic import output_dir
from ..checkpoint import CheckpointReader, CheckpointWriter
from ..errors import ModelError
from ..stage import Reporter, StageResult, describe_files
from ..awq.pack import PACK, pack_rows, unpack, unpack_rows
from ..awq.stage import CALIBRATION_FILE
from .common import copy_side_files

PARTS = (".weight_packed", ".weight_scale", ".weight_shape", ".weight_zero_point")
INFO_FILE = "w4a16.json"


def ct_quantization_config(group_size: int, ignore: list[str]) -> dict:
    """config.json's quantization_config: one group of Linear targets, 4-bit int weights, asymmetric groups."""
    weights = {"num_bits": 4, "type": "int", "symmetric": False, "group_size": group_size, "strategy": "group",
               "dynamic": False, "actorder": None, "observer": "minmax"}
    return {"config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "kv_cache_scheme": None, "global_compression_ratio": None, "ignore": ignore}


def w4a16_linear(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """One GEMM linear's qweight [K, N/8], qzeros [G, N/8], scales [G, N] as the four compressed-tensors tensors."""
    codes = unpack(qweight)                                   # [K, N]
    zeros = unpack(qzeros)                                    # [G, N]
    k, n = codes.shape
    return {".weight_packed": pack_rows(codes.t()),
            ".weight_scale": scales.t().to(torch.float16).contiguous(),
            ".weight_shape": torch.tensor([n, k], dtype=torch.int64),
            ".weight_zero_point": pack_rows(zeros).t().contiguous()}


def dequantize_w4a16(packed: torch.Tensor, scale: torch.Tensor, shape, zero_point: torch.Tensor | None,
                     group_size: int) -> torch.Tensor:
    """float32 weight [N, K] of a pack-quantized linear: ``(q - zp) * scale`` (codes and zero points unsigned)."""
    n, k = (int(x) for x in shape)
    if packed.shape != (n, -(-k // PACK)) or scale.shape != (n, k // group_size):
        raise ModelError(f"pack-quantized tensors of shapes {tuple(packed.shape)}, scale {tuple(scale.shape)} do not "
                         f"fit weight shape {(n, k)} and group size {group_size}")
    q = unpack_rows(packed)[:, :k].to(torch.float32)
    if zero_point is None:
        z = torch.full((n, k // group_size), 8.0)
    else:
        if zero_point.shape != (-(-n // PACK), k // group_size):
            raise ModelError(f"weight_zero_point of shape {tuple(zero_point.shape)} does not fit {(n, k)}")
        z = unpack_rows(zero_point.t().contiguous())[:, :n].t().to(torch.float32)
    z = z.repeat_interleave(group_size, 1)
    s = scale.to(torch.float32).repeat_interleave(group_size, 1)
    return (q - z) * s


def _awq_group_size(config: dict, folder: Path) -> int:
    from ..awq.evaluate import awq_quantization

    return int(awq_quantization(config, folder)["group_size"])


def convert(awq_dir: str | os.PathLike, out_dir: str | os.PathLike, reporter: Reporter | None = None, *,
            overwrite: bool = False) -> StageResult:
    """Write the W4A16 folder ``out_dir`` from the AWQ GEMM folder ``awq_dir`` (a pure repack: no rounding)."""
    reporter = reporter or Reporter()
    awq_dir, out = Path(awq_dir), Path(out_dir)
    start = time.perf_counter()
    with CheckpointReader(awq_dir) as reader:
        config = reader.config
        g = _awq_group_size(config, awq_dir)
        specs, linears, ignore = [], [], []
        for name, info in reader.tensors.items():
            if name.endswith(".qweight"):
                base = name.removesuffix(".qweight")
                for part in (".qzeros", ".scales"):
                    if base + part not in reader:
                        raise ModelError(f"{awq_dir} has {name} but no {base + part}; make the folder again with "
                                         "releaser awq")
                k, n8 = info.shape
                n = n8 * PACK
                specs += [(base + ".weight_packed", torch.int32, (n, k // PACK)),
                          (base + ".weight_scale", torch.float16, (n, k // g)),
                          (base + ".weight_shape", torch.int64, (2,)),
                          (base + ".weight_zero_point", torch.int32, (n // PACK, k // g))]
                linears.append(base)
            elif not name.endswith((".qzeros", ".scales")):
                specs.append((name, info.dtype, tuple(info.shape)))
                if len(info.shape) == 2 and name.endswith(".weight") and "embed" not in name:
                    ignore.append(name.removesuffix(".weight"))   # lm_head, MoE routers: Linears kept in float
        if not linears:
            raise ModelError(f"{awq_dir} has no .qweight tensors; is it an AWQ folder?")
        ignore = ["lm_head", *sorted(n for n in ignore if n != "lm_head")]
        with output_dir(out, overwrite=overwrite) as tmp:
            staging = tmp / "weights"
            with CheckpointWriter(staging, specs, overwrite=True) as writer:
                with reporter.progress("W4A16 (compressed-tensors)", total=len(specs)) as advance:
                    for name, _, _ in specs:
                        if name.endswith(PARTS):
                            continue
                        writer.write(name, reader.read(name))
                        advance()
                    for base in linears:
                        parts = w4a16_linear(reader.read(base + ".qweight"), reader.read(base + ".qzeros"),
                                             reader.read(base + ".scales"))
                        for part, t in parts.items():
                            writer.write(base + part, t)
                        advance(len(parts))
                writer.commit()
            for f in staging.iterdir():
                os.replace(f, tmp / f.name)
            staging.rmdir()
            copy_side_files(awq_dir, tmp)
            if (awq_dir / CALIBRATION_FILE).is_file():   # the calibration the codes were searched with (cards)
                shutil.copyfile(awq_dir / CALIBRATION_FILE, tmp / CALIBRATION_FILE)
            out_config = {k: v for k, v in config.items() if k != "quantization_config"}
            out_config["quantization_config"] = ct_quantization_config(g, ignore)
            (tmp / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
            facts = {"format": "pack-quantized", "bits": 4, "group_size": g, "symmetric": False,
                     "source": "awq", "linears": len(linears)}
            (tmp / INFO_FILE).write_text(json.dumps(facts, indent=2) + "\n")
    seconds = time.perf_counter() - start
    summary = f"W4A16 (compressed-tensors pack-quantized, g{g}) of {awq_dir.name}: {len(linears)} linears, " \
              f"{seconds:.1f} s -> {out}"
    return StageResult("w4a16", out, describe_files(out), summary, {**facts, "seconds": round(seconds, 2)})


def run(options, inputs: str | os.PathLike, out: str | os.PathLike, reporter: Reporter | None = None, *,
        overwrite: bool = False, describe=describe_files) -> StageResult:
    """The ``w4a16`` stage: :func:`convert` of the AWQ folder ``inputs`` into ``out``."""
    result = convert(inputs, out, reporter, overwrite=overwrite)
    return StageResult("w4a16", Path(out), describe(Path(out)), result.summary, result.facts)
