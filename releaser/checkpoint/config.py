"""The size fields of a model's config.json, checked before any work: present, positive whole numbers, agreeing with
the weights, and (for two folders that must be the same model) agreeing with each other."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelError

if TYPE_CHECKING:
    from ..arch import Architecture
    from .reader import CheckpointReader

SIZE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads")
OPTIONAL_SIZE_KEYS = ("num_key_value_heads", "head_dim", "vocab_size")
RESTORE = "restore it from the model's original config.json"


def read_json(path: str | os.PathLike, fix: str) -> dict:
    """A JSON file that must hold an object (config.json, tokenizer_config.json, ...): one-line errors naming the file
    and ``fix`` when it cannot be read, is not JSON or is not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not hold a JSON object; {fix}")
    return data


def read_config(folder: str | os.PathLike) -> dict:
    """The config.json of a model folder: the one reader of it for every stage, with one-line errors (missing, not
    JSON, not a JSON object)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    return read_json(folder / "config.json", RESTORE)


def _size(config: dict, key: str, path: Path) -> int:
    value = config.get(key)
    if value is None:
        raise ModelError(f"{path} has no {key}; {RESTORE}")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelError(f"{path}: {key} is {value!r}, not a positive whole number; {RESTORE}")
    return value


def check_sizes(reader: CheckpointReader, arch: Architecture) -> dict[str, int]:
    """The layer count, hidden_size, intermediate_size and head counts of ``reader``'s config.json (each present and a
    positive whole number) checked against the weights: the layers the checkpoint holds, the embedding's width and
    the MLP's width. Returns the sizes by key."""
    path = reader.folder / "config.json"
    config = reader.config
    keys = (arch.num_layers_key, *SIZE_KEYS, *(k for k in OPTIONAL_SIZE_KEYS if config.get(k) is not None))
    sizes = {key: _size(config, key, path) for key in keys}
    layers = sorted({arch.layer_of(name) for name in reader.tensors} - {None})
    n = sizes[arch.num_layers_key]
    if layers != list(range(n)):
        held = f"layers {layers[0]}-{layers[-1]} ({len(layers)})" if layers else "no layers"
        raise ModelError(f"{path} says {arch.num_layers_key} {n} but the weights hold {held}; {RESTORE}")
    widths = [("hidden_size", arch.embed, -1), ("intermediate_size", arch.layer_name(0, "mlp.down_proj.weight"), -1)]
    for key, tensor, axis in widths:
        info = reader.tensors.get(tensor)
        if info is not None and len(info.shape) == 2 and info.shape[axis] != sizes[key]:
            raise ModelError(f"{path} says {key} {sizes[key]} but {tensor} is {info.shape[axis]} wide; {RESTORE}")
    return sizes


def check_same_model(config: dict, other: dict, where: str, other_where: str, fix: str) -> None:
    """Refuse two config.json that do not describe one model (architecture or any size differs), naming the first
    difference."""
    keys = ("architectures", "model_type", "num_hidden_layers", *SIZE_KEYS, *OPTIONAL_SIZE_KEYS)
    for key in keys:
        if config.get(key) != other.get(key):
            raise ModelError(f"{where} and {other_where} are not the same model ({key} {config.get(key)!r} vs "
                             f"{other.get(key)!r}); {fix}")


def check_unquantized(config: dict, folder: str | os.PathLike, task: str) -> None:
    """A one-line ModelError when ``config`` (of ``folder``) describes quantized weights: ``task`` (AWQ, an
    importance matrix) starts from the unquantized model."""
    qc = config.get("quantization_config")
    if isinstance(qc, dict):
        raise ModelError(f"{folder} is already quantized ({qc.get('quant_method')}); {task} needs the unquantized "
                         "model folder")


CONFIG_JUNK = ("_name_or_path", "_model_name_or_path", "_commit_hash")   # where a loaded config came from


def clean_config(config: dict) -> dict:
    """``config.json`` without the keys that only say where a loaded copy came from (stale in a released folder)."""
    return {k: v for k, v in config.items() if k not in CONFIG_JUNK}
