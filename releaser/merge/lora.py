"""LoRA sources: a PEFT LoRA adapter folded into its base model's tensors as they are read (nothing merged on disk).

For each adapted module ``W <- W + weight * scale * (B @ A)`` (transposed for ``fan_in_fan_out`` layers and for
embeddings), with ``scale = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``), ``r`` and ``alpha`` taken from
``rank_pattern`` / ``alpha_pattern`` where a pattern matches the module, as peft does. Whole tensors an adapter stores
(``modules_to_save``, resized embeddings) replace the base tensor at weight 1 and are interpolated towards at other
weights. ``weight`` 1.0 equals peft's ``merge_and_unload``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import CheckpointReader
from ..errors import ModelError

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.weight)?$|"
                       r"^(?P<emodule>.+)\.(?P<ekind>lora_embedding_A|lora_embedding_B)$")


@dataclass
class _Delta:
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    transpose: bool


def _pattern_key(patterns: dict, module: str) -> str | None:
    """peft's ``get_pattern_key``: the first pattern that matches the end of the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _load_state(folder: Path) -> dict[str, torch.Tensor]:
    st = folder / "adapter_model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(st))
        except Exception as exc:  # safetensors raises several kinds for a damaged file
            raise ModelError(f"{st} is not a valid safetensors file ({exc}); re-create or re-download the adapter") \
                from exc
    binary = folder / "adapter_model.bin"
    if binary.is_file():
        try:
            return torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad or unsafe pickle
            raise ModelError(f"{binary} cannot be loaded safely ({type(exc).__name__}); "
                             "convert it to adapter_model.safetensors") from exc
    raise ModelError(f"LoRA folder {folder} has no adapter_model.safetensors; save the adapter with peft's "
                     "save_pretrained (adapter_config.json + adapter_model.safetensors)")


class LoraAdapter:
    """A PEFT LoRA adapter read from a local folder, checked against the model it is applied to."""

    def __init__(self, folder: str | Path, weight: float):
        self.folder = Path(folder)
        self.weight = float(weight)
        if not self.folder.is_dir():
            raise ModelError(f"LoRA adapter {self.folder} not found: releaser reads adapters from local folders; "
                             "check the path")
        config_path = self.folder / "adapter_config.json"
        if not config_path.is_file():
            raise ModelError(f"LoRA folder {self.folder} has no adapter_config.json; is it a peft adapter folder?")
        try:
            cfg = json.loads(config_path.read_text())
        except ValueError as exc:
            raise ModelError(f"{config_path} is not valid JSON ({exc})") from exc
        kind = str(cfg.get("peft_type", "LORA")).upper()
        if kind != "LORA":
            raise ModelError(f"{self.folder} is a {kind} adapter; releaser folds only LoRA adapters (peft_type LORA)")
        if cfg.get("use_dora"):
            raise ModelError(f"{self.folder} is a DoRA adapter (use_dora: true), which releaser does not support; "
                             "merge it with peft's merge_and_unload first")
        if cfg.get("lora_bias"):
            raise ModelError(f"{self.folder} trains LoRA biases (lora_bias: true), which releaser does not support")
        if cfg.get("layer_replication"):
            raise ModelError(f"{self.folder} uses layer_replication, which releaser does not support")
        self.config = cfg
        self.deltas: dict[str, _Delta] = {}        # module name (as the adapter names it) -> low-rank update
        self.replacements: dict[str, torch.Tensor] = {}   # tensor name (as the adapter names it) -> whole tensor
        self._parse(_load_state(self.folder))

    def _parse(self, state: dict[str, torch.Tensor]) -> None:
        cfg = self.config
        parts: dict[str, dict[str, torch.Tensor]] = {}
        embedding: set[str] = set()
        for key, value in state.items():
            name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            m = _LORA_KEY.match(name)
            if m:
                module = m.group("module") or m.group("emodule")
                kind = (m.group("kind") or m.group("ekind"))[-1]   # "A" or "B"
                if m.group("emodule"):
                    embedding.add(module)
                parts.setdefault(module, {})[kind] = value
            else:
                self.replacements[name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")] = value
        if not parts and not self.replacements:
            raise ModelError(f"{self.folder}/adapter_model.safetensors holds no LoRA weights")
        ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        for module, ab in parts.items():
            if set(ab) != {"A", "B"}:
                raise ModelError(f"{self.folder}: module {module} has lora_{'A' if 'B' in ab else 'B'} missing; "
                                 "the adapter file is incomplete")
            a, b = ab["A"], ab["B"]
            if a.dim() != 2 or b.dim() != 2:
                raise ModelError(f"{self.folder}: module {module} is not a linear or embedding layer "
                                 f"(lora_A shape {list(a.shape)}); releaser folds only those")
            r_key, a_key = _pattern_key(ranks, module), _pattern_key(alphas, module)
            r = ranks[r_key] if r_key is not None else cfg.get("r", 8)
            alpha = alphas[a_key] if a_key is not None else cfg.get("lora_alpha", 8)
            if a.shape[0] != r or b.shape[1] != r:
                raise ModelError(f"{self.folder}: module {module} has rank {a.shape[0]} but adapter_config.json says "
                                 f"r={r}; the adapter files do not belong together")
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            transpose = module in embedding or bool(cfg.get("fan_in_fan_out"))
            self.deltas[module] = _Delta(a, b, scale, transpose)

    def bind(self, reader: CheckpointReader, label: str) -> dict[str, tuple[_Delta | None, torch.Tensor | None]]:
        """Map every update to a tensor of ``reader``; raises when a target is missing or does not fit."""
        names = reader.tensors
        out: dict[str, tuple[_Delta | None, torch.Tensor | None]] = {}

        def find(tensor: str) -> str | None:
            for cand in (tensor, "model." + tensor, tensor.removeprefix("model.")):
                if cand in names:
                    return cand
            return None

        for module, delta in self.deltas.items():
            target = find(module + ".weight")
            if target is None:
                raise ModelError(f"LoRA {self.folder} targets {module}, which {label} does not have; the adapter was "
                                 "trained for another model (check adapter_config.json base_model_name_or_path)")
            rows, cols = delta.b.shape[0], delta.a.shape[1]
            want = (cols, rows) if delta.transpose else (rows, cols)
            shape = tuple(names[target].shape)
            if shape != want:
                raise ModelError(f"LoRA {self.folder} does not fit {label}: {module} update is {list(want)} but "
                                 f"{target} is {list(shape)}; the adapter was trained for another model size")
            out[target] = (delta, None)
        for name, tensor in self.replacements.items():
            target = find(name)
            if target is None:
                raise ModelError(f"LoRA {self.folder} replaces {name}, which {label} does not have; the adapter was "
                                 "trained for another model")
            if tuple(names[target].shape) != tuple(tensor.shape):
                raise ModelError(f"LoRA {self.folder} stores {name} as {list(tensor.shape)} but {label} has "
                                 f"{list(names[target].shape)}; resized vocabularies are not supported")
            previous = out.get(target, (None, None))[0]
            out[target] = (previous, tensor)
        return out


class LoraReader:
    """A :class:`CheckpointReader` of a base model with a LoRA folded into the tensors it returns."""

    def __init__(self, reader: CheckpointReader, adapter: LoraAdapter, label: str):
        self.base = reader
        self.adapter = adapter
        self.folder, self.config, self.tensors = reader.folder, reader.config, reader.tensors
        self.updates = adapter.bind(reader, label)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str) -> torch.Tensor:
        return self._fold(name, self.base.read(name))

    def map(self, name: str) -> torch.Tensor:
        return self._fold(name, self.base.map(name))

    def _fold(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        update = self.updates.get(name)
        if update is None:
            return tensor
        delta, replacement = update
        weight = self.adapter.weight
        work = torch.float64 if tensor.dtype == torch.float64 else torch.float32
        out = tensor.to(work)
        if replacement is not None:
            out = out + weight * (replacement.to(work) - out) if weight != 1 else replacement.to(work).clone()
        if delta is not None:
            product = delta.b.to(work) @ delta.a.to(work)
            if delta.transpose:
                product = product.T
            out.add_(product, alpha=weight * delta.scale)
        return out.to(tensor.dtype)

    def close(self) -> None:
        self.base.close()
