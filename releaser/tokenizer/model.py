"""Read the tokenizer-related files of a Hugging Face model folder (never modified here)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import CheckpointReader
from ..checkpoint.config import read_config
from ..checkpoint.reader import check_folder
from ..errors import ModelError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
UNTRAINED_ABS = 1e-16      # a row whose largest |value| is below this was never trained (unsloth's test)
UNTRAINED_NORM = 0.01      # ... or whose norm is below this fraction of the median row norm


def read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}); repair or re-download it") from None


def eos_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def load_tokenizer(folder: str | Path, needed_for: str = ""):
    """The tokenizer of a model folder: the one loader every stage uses (local files only, never remote code,
    transformers' warnings quiet). A missing or broken tokenizer is a one-line ModelError naming the folder;
    ``needed_for`` says what needs it (e.g. "AWQ calibration")."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    why = f" ({needed_for} needs it)" if needed_for else ""
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model){why}; "
                         "copy the tokenizer files from the base model")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a broken tokenizer
        raise ModelError(f"cannot load the tokenizer in {folder} ({type(exc).__name__}: {exc}){why}; "
                         "check tokenizer.json and tokenizer_config.json") from None
    finally:
        hf_logging.set_verbosity(verbosity)


@dataclass
class ModelFolder:
    path: Path
    config: dict
    generation: dict | None
    tokenizer: object

    @classmethod
    def open(cls, path: str | Path) -> ModelFolder:
        path = Path(path)
        check_folder(path)
        return cls(path, read_config(path), read_json(path / "generation_config.json"), load_tokenizer(path))

    @property
    def generation_eos(self) -> list[int]:
        return eos_list((self.generation or {}).get("eos_token_id"))

    def token_id(self, token: str) -> int | None:
        """Id of ``token`` when it is a single token of the vocabulary."""
        tid = self.tokenizer.convert_tokens_to_ids(token)
        unk = self.tokenizer.unk_token_id
        if tid is None or (tid == unk and token != self.tokenizer.unk_token):
            return None
        return tid

    def has_weights(self) -> bool:
        return any(self.path.glob("*.safetensors")) or any(self.path.glob("pytorch_model*.bin"))


def embedding_names(reader: CheckpointReader) -> tuple[str, str | None]:
    """(input embedding, lm_head or None when tied) tensor names."""
    embed = next((n for n in reader.tensors if n.endswith("embed_tokens.weight")), None)
    if embed is None:
        raise ModelError(f"{reader.folder} has no embed_tokens tensor; releaser cannot check embedding rows")
    head = "lm_head.weight" if "lm_head.weight" in reader.tensors else None
    return embed, head


def untrained_mask(matrix: torch.Tensor) -> torch.Tensor:
    """True for rows that look untrained: all (near) zero, or far smaller than the median row."""
    m = matrix.float()
    norms = m.norm(dim=1)
    return (m.abs().amax(dim=1) <= UNTRAINED_ABS) | (norms < UNTRAINED_NORM * norms.median())


def untrained_rows(matrix: torch.Tensor, ids) -> list[int]:
    mask = untrained_mask(matrix)
    return sorted({i for i in ids if i is not None and i < matrix.shape[0] and bool(mask[i])})


def trained_mean(matrix: torch.Tensor) -> torch.Tensor:
    """Mean of the trained rows (as float32)."""
    return matrix.float()[~untrained_mask(matrix)].mean(dim=0)
