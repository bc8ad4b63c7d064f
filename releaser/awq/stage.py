"""The ``awq`` stage: ``run(options, inputs, out, reporter) -> StageResult`` and :func:`run_awq` (the quantization)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from ..atomic import output_dir
from ..checkpoint import CheckpointReader, CheckpointWriter, architecture_for
from ..checkpoint.config import check_sizes, check_unquantized, clean_config
from ..errors import ModelError
from ..stage import Reporter, StageResult, describe_files
from .calib import calibration
from .options import CPU_SEARCH_TOKENS, AWQOptions
from .run import (BlockRunner, Settings, awq_linears, block_state, family_classes, output_specs, pick_group_size,
                  quantized_tensors, resolve_device, use_all_cores)

CALIBRATION_FILE = "awq_calibration.json"
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
              "chat_template.json")


def load_tokenizer(model_dir: Path):
    from ..tokenizer.model import load_tokenizer as load

    return load(model_dir, "AWQ calibration")


def awq_config(config: dict, bits: int, group_size: int, arch=None) -> dict:
    out = clean_config(config)
    keep = ["lm_head"]
    if arch is not None and arch.experts is not None:   # the router stays float16
        keep.append(arch.experts.router.removesuffix(".weight"))
    out["quantization_config"] = {"quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True,
                                  "version": "gemm", "modules_to_not_convert": keep}
    out["torch_dtype"] = "float16"
    if "dtype" in out:
        out["dtype"] = "float16"
    return out


def check_moe(reader: CheckpointReader, arch, model_dir: Path) -> None:
    """AWQ of a mixture-of-experts model: every layer an MoE block, experts stored one tensor per expert linear."""
    config, x = reader.config, arch.experts
    shapes = {n: tuple(i.shape) for n, i in reader.tensors.items()}
    x.check(config, shapes, arch.layer_prefix, str(model_dir))
    if config.get("mlp_only_layers") or (config.get("decoder_sparse_step", 1) or 1) != 1:
        raise ModelError(f"{arch.label} with dense layers (mlp_only_layers or decoder_sparse_step > 1) is not "
                         "supported by awq yet; it handles models with an MoE block in every layer")
    other = next((n for n in reader.tensors if (p := x.locate(n, arch.layer_prefix)) and p[1] != "expert"), None)
    if other is not None:
        raise ModelError(f"{model_dir} stores its experts fused ({other}); awq reads one tensor per expert "
                         "(mlp.experts.{e}.gate_proj.weight, as released checkpoints and save_pretrained have them)")


def run_awq(options: AWQOptions, model_dir: str | os.PathLike, out_dir: str | os.PathLike,
            reporter: Reporter | None = None, overwrite: bool = False) -> StageResult:
    """Quantize ``model_dir`` (an HF folder of a family AWQ supports, see releaser/arch) to a 4-bit AWQ GEMM folder
    ``out_dir``."""
    reporter = reporter or Reporter()
    model_dir, out = Path(model_dir), Path(out_dir)
    start = time.perf_counter()
    reader = CheckpointReader(model_dir)
    config = reader.config
    check_unquantized(config, model_dir, "AWQ")
    arch = architecture_for(config, str(model_dir))
    n_layers = check_sizes(reader, arch)[arch.num_layers_key]
    classes = family_classes(config, str(model_dir))
    hf = classes[3]
    if arch.experts is not None:
        check_moe(reader, arch, model_dir)
    group_size = pick_group_size(hf, options.group_size, arch)
    if group_size != options.group_size:
        reporter.warning(f"group size {options.group_size} does not divide every layer width of {model_dir.name}; "
                         f"using group size {group_size}")
    tokenizer = load_tokenizer(model_dir)
    calib = calibration(options.calibration, tokenizer, options.samples, options.seqlen)
    device = resolve_device(options.device)
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    threads = use_all_cores()
    search_tokens = options.search_tokens or (CPU_SEARCH_TOKENS if device.type == "cpu" else None)
    settings = Settings(group_size, device, dtype, search_tokens)
    linears = awq_linears(arch, hf)
    specs = output_specs(reader, arch, n_layers, group_size, linears)
    where = device.type if device.type != "cpu" else f"cpu, {threads} thread{'s' if threads > 1 else ''}"
    reporter.message(f"AWQ {options.bits}-bit g{group_size} on {where}: {calib.ids.shape[0]} rows x "
                     f"{calib.seq_len} tokens from {calib.samples} samples of {calib.dataset}")
    embed = reader.read(arch.embed)
    hidden = embed[calib.ids].to(device, dtype)
    if arch.embed_scale:   # Gemma: the embedding output times sqrt(hidden), in the weights' dtype as transformers
        hidden *= torch.tensor(hf.hidden_size ** 0.5, dtype=embed.dtype).to(dtype)
    del embed
    runner = BlockRunner(classes, settings, calib.seq_len, arch)
    ratios = []
    with output_dir(out, overwrite=overwrite) as tmp:
        staging = tmp / "weights"
        with CheckpointWriter(staging, specs, overwrite=True) as writer:
            for name, _, _ in specs:
                if arch.layer_of(name) is None:
                    writer.write(name, reader.read(name).to(torch.float16).contiguous())
            with reporter.progress("AWQ blocks", total=n_layers) as advance:
                for i in range(n_layers):
                    layer = runner.build(block_state(reader, arch, i), i)
                    hidden_next, feats = runner.capture(layer, hidden)
                    ratios.append(runner.awq_block(layer, feats).ratios)
                    for name, t in quantized_tensors(layer, arch.layer_name(i, ""), group_size, linears).items():
                        writer.write(name, t)
                    hidden = hidden_next
                    del layer, feats, hidden_next
                    advance()
            writer.commit()
        for f in staging.iterdir():
            os.replace(f, tmp / f.name)
        staging.rmdir()
        for name in SIDE_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, tmp / name)
        (tmp / "config.json").write_text(json.dumps(awq_config(config, options.bits, group_size, arch), indent=2) + "\n")
        (tmp / "quant_config.json").write_text(json.dumps(
            {"zero_point": True, "q_group_size": group_size, "w_bit": options.bits, "version": "GEMM"}, indent=2) + "\n")
        seconds = time.perf_counter() - start
        facts = {"dataset": calib.dataset, "samples": calib.samples, "seq_len": calib.seq_len,
                 "rows": int(calib.ids.shape[0]), "tokens": calib.tokens, "bits": options.bits,
                 "group_size": group_size, "requested_group_size": options.group_size, "zero_point": True,
                 "version": "gemm", "device": device.type,
                 "search_tokens": min(search_tokens or calib.tokens, calib.tokens),
                 "clip": True, "scale_ratios": ratios}
        # no run time nor thread count (it follows the machine's load): same inputs, same bytes
        (tmp / CALIBRATION_FILE).write_text(json.dumps(facts, indent=2) + "\n")
    files = describe_files(out)
    summary = (f"AWQ {options.bits}-bit g{group_size} of {model_dir.name}: {n_layers} blocks, {calib.tokens} "
               f"calibration tokens, {seconds:.0f} s -> {out}")
    return StageResult("awq", out, files, summary,
                       {**{k: v for k, v in facts.items() if k != "scale_ratios"}, "threads": threads,
                        "seconds": round(seconds, 1)})


def run(options: AWQOptions, inputs: str | os.PathLike, out: str | os.PathLike, reporter: Reporter | None = None,
        *, kept: StageResult | None = None, overwrite: bool = False, describe=describe_files) -> StageResult:
    """:func:`run_awq` of the model folder ``inputs`` into ``out``. ``kept``: an earlier run's result whose tensors
    are still right (same weights, options and calibration; files intact): ``out`` again with ``inputs``' tokenizer
    files and its quantized tensors hard-linked unchanged."""
    inputs, out = Path(inputs), Path(out)
    if kept is None:
        result = run_awq(options, inputs, out, reporter, overwrite=overwrite)
        return StageResult("awq", out, describe(out), result.summary, result.facts)
    from ..tokenizer.output import _copy_into

    side = [n for n in SIDE_FILES if (inputs / n).is_file()]
    with output_dir(out, overwrite=overwrite) as tmp:
        _copy_into(out, tmp, {}, skip_weights=False, skip=set(SIDE_FILES), link=True)
        for name in side:
            shutil.copyfile(inputs / name, tmp / name)
    paths = [f.path for f in kept.files if f.path not in SIDE_FILES]   # not the cards stage's README
    return StageResult("awq", out, describe(out, [out / p for p in sorted([*paths, *side])]),
                       f"tokenizer files updated ({', '.join(side)}), tensors unchanged",
                       {**kept.facts, "metadata_only": True})
