"""Torch models built from an artefact's own bytes: every GGUF tensor dequantized with gguf-py (names mapped back to
Hugging Face names, llama.cpp's Q/K row permutation undone for Llama), or every AWQ GEMM linear unpacked to float
weights. The architecture is transformers' own (LlamaForCausalLM, ...), run in float32."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import CheckpointReader, architecture_for
from ..errors import ModelError
from .ggufio import GGUFFile

SPLIT = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)   # nibble i of a GEMM word holds output column 8c + AWQ_ORDER[i]


@dataclass(frozen=True)
class Artefact:
    path: Path      # the .gguf file (first part of a split set) or the AWQ folder
    kind: str       # "gguf" | "awq"
    quant: str      # GGUF file type (Q4_K_M, F16, ...) or "AWQ" for an AWQ folder
    label: str      # what tables show: the file or folder name

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


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{folder} has no config.json; is it a Hugging Face model folder?") from None
    except ValueError as exc:
        raise ModelError(f"{path} is not valid JSON ({exc})") from None


def identify(path: str | os.PathLike) -> Artefact:
    """What an artefact path is: a GGUF file (with its file type) or an AWQ folder."""
    import gguf

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
        qc = read_config(path).get("quantization_config") or {}
        if str(qc.get("quant_method", "")).lower() == "awq":
            return Artefact(path, "awq", "AWQ", path.name)
        raise ModelError(f"{path} is not an AWQ folder (config.json has no awq quantization_config); "
                         "evaluate GGUF files or AWQ folders")
    if not path.exists():
        raise ModelError(f"artefact {path} does not exist")
    raise ModelError(f"{path} is neither a .gguf file nor an AWQ folder")


# ---------------------------------------------------------------------------------------------------- models


def skeleton(config: dict):
    """An uninitialised float32 transformers model of ``config``'s architecture (weights are assigned after)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    architecture_for(config)  # refuse what releaser does not support, with its message
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    hf_config = AutoConfig.for_model(**config)
    with no_init_weights():
        return AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)


def build(config: dict, tensors: Iterable[tuple[str, torch.Tensor]], source: Path):
    """The model of ``config`` with the weights ``tensors`` ((HF name, tensor) pairs), copied in one at a time (peak
    memory: the model plus one tensor); lm_head shares the embedding when the source has none (tied weights)."""
    model = skeleton(config)
    params = dict(model.named_parameters())
    seen: set[str] = set()
    for name, value in tensors:
        param = params.get(name)
        if param is None:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            raise ModelError(f"{source} has a tensor {name} that {type(model).__name__} does not have; is it a file "
                             "of this model?")
        if tuple(value.shape) != tuple(param.shape):
            raise ModelError(f"{source}: {name} has shape {tuple(value.shape)}, the model needs "
                             f"{tuple(param.shape)}; is it a file of this model?")
        with torch.no_grad():
            param.copy_(value)
        seen.add(name)
    if "lm_head.weight" in params and "lm_head.weight" not in seen:
        model.lm_head.weight = model.get_input_embeddings().weight
        seen.add("lm_head.weight")
    missing = [k for k in params if k not in seen]
    if missing:
        raise ModelError(f"{source} has no tensor for {missing[0]} ({len(missing)} missing); is it a file of this "
                         "model?")
    return model.eval()


def load_hf(model_dir: Path):
    """The unquantized model, in float32."""
    with CheckpointReader(model_dir) as reader:
        architecture_for(reader.config, str(model_dir))
        return build(reader.config, ((n, reader.read(n)) for n in reader.tensors), Path(model_dir))


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation (ggml interleaved RoPE order -> HF rotate-half order)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(artefact: Artefact, config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a GGUF file dequantized to float32, under its Hugging Face name, one at a time."""
    import gguf

    from ..gguf.convert import GGUF_ARCH

    family = architecture_for(config)
    arch = GGUF_ARCH[family.name]
    n_layer = config["num_hidden_layers"]
    n_head = config["num_attention_heads"]
    n_head_kv = config.get("num_key_value_heads") or n_head
    names = gguf.get_tensor_name_map(arch, n_layer)
    hf_names = {names.get_name(hf, try_suffixes=(".weight", ".bias")): hf for hf in _hf_tensor_names(config)}
    for part in artefact.parts:
        reader = GGUFFile(part)
        got = reader.values.get("general.architecture")
        if got is not None and got != gguf.MODEL_ARCH_NAMES[arch]:
            raise ModelError(f"{part} is a {got} GGUF, the model is {gguf.MODEL_ARCH_NAMES[arch]}")
        for name in reader.tensors:
            if name == "rope_freqs.weight":
                continue  # llama3 RoPE factors: transformers computes them from the config
            hf = hf_names.get(name)
            if hf is None:
                raise ModelError(f"{part} has a tensor {name} that {family.classes[0]} does not have")
            data = reader.dequantize(name)
            if arch == gguf.MODEL_ARCH.LLAMA and hf.endswith(("q_proj.weight", "q_proj.bias")):
                data = unpermute_qk(data, n_head)
            elif arch == gguf.MODEL_ARCH.LLAMA and hf.endswith(("k_proj.weight", "k_proj.bias")):
                data = unpermute_qk(data, n_head_kv)
            yield hf, torch.from_numpy(np.ascontiguousarray(data))


def _hf_tensor_names(config: dict) -> list[str]:
    with torch.device("meta"):
        return list(skeleton(config).state_dict())


def unpack_gemm(words: torch.Tensor) -> torch.Tensor:
    """AWQ GEMM int32 words [R, C] -> 4-bit values [R, 8C] in logical column order."""
    w = words.numpy().view(np.uint32)
    nibbles = np.stack([(w >> (4 * i)) & 0xF for i in range(8)], axis=-1)   # [R, C, 8] in nibble order
    out = np.empty_like(nibbles)
    out[..., list(AWQ_ORDER)] = nibbles
    return torch.from_numpy(out.reshape(w.shape[0], -1).astype(np.int16))


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int,
                   group_size: int) -> torch.Tensor:
    """A GEMM linear's float32 weight [out, in]: W_T[k, n] = (q[k, n] - z[k // gs, n]) * s[k // gs, n]."""
    if bits != 4:
        raise ModelError(f"AWQ with {bits} bits is not supported (GEMM checkpoints are 4-bit)")
    q = unpack_gemm(qweight).to(torch.float32)                 # [K, N]
    z = unpack_gemm(qzeros).to(torch.float32)                  # [G, N]
    s = scales.to(torch.float32)                               # [G, N]
    k = q.shape[0]
    if k != z.shape[0] * group_size or s.shape != z.shape:
        raise ModelError(f"AWQ tensors of shapes qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                         f"scales {tuple(scales.shape)} do not fit group size {group_size}")
    g = torch.arange(k) // group_size
    return ((q - z[g]) * s[g]).T.contiguous()


def awq_tensors(reader: CheckpointReader) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight of an AWQ folder as float32 under its Hugging Face name, one at a time."""
    qc = reader.config["quantization_config"]
    if str(qc.get("version", "gemm")).lower() != "gemm":
        raise ModelError(f"{reader.folder}: AWQ version {qc.get('version')} is not supported; only GEMM")
    bits, gs = int(qc.get("bits", qc.get("w_bit", 4))), int(qc.get("group_size", qc.get("q_group_size", 128)))
    for name in reader.tensors:
        if name.endswith((".qzeros", ".scales")):
            continue
        if name.endswith(".qweight"):
            prefix = name.removesuffix(".qweight")
            for part in (".qzeros", ".scales"):
                if prefix + part not in reader:
                    raise ModelError(f"{reader.folder} has {name} but no {prefix + part}")
            yield prefix + ".weight", dequantize_awq(reader.read(name), reader.read(prefix + ".qzeros"),
                                                     reader.read(prefix + ".scales"), bits, gs)
        else:
            yield name, reader.read(name).to(torch.float32)


def load_artefact(artefact: Artefact, base_config: dict):
    """The torch model of an artefact: GGUF with the unquantized model's config, AWQ with its own."""
    if artefact.kind == "gguf":
        return build(base_config, gguf_tensors(artefact, base_config), artefact.path)
    with CheckpointReader(artefact.path) as reader:
        return build(reader.config, awq_tensors(reader), artefact.path)


def scored_logits(model, first: int, rows: int = 64):
    """``run(tokens [ctx])``: the model's logits at positions first..ctx-2 in blocks of ``rows`` positions (the
    lm_head runs only on those, one block at a time)."""

    def run(tokens: torch.Tensor):
        with torch.no_grad():
            hidden = model.model(tokens.view(1, -1)).last_hidden_state[0, first:-1]
        for block in hidden.split(rows):
            with torch.no_grad():
                logits = model.lm_head(block).float()
            yield logits

    return run
