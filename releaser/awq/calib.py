"""Calibration text: the shipped public-domain corpus (``builtin``, see data/SOURCE.md) or the user's .txt/.jsonl file,
turned into rows of token ids the way AutoAWQ does it (samples longer than seqlen are skipped, the accepted samples
are concatenated and cut into full rows)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from .options import BUILTIN

DATA = Path(__file__).parent / "data"
BUILTIN_FILE = DATA / "kjv_calibration.txt"
BUILTIN_NAME = "King James Bible (Genesis, Exodus, Ruth, 1 Samuel; public domain, shipped with releaser)"


@dataclass(frozen=True)
class Calibration:
    dataset: str          # a human-readable name of the text
    samples: int          # samples accepted
    seq_len: int
    ids: torch.Tensor     # int64 [rows, seq_len]

    @property
    def tokens(self) -> int:
        return self.ids.numel()


def read_texts(source: str | Path) -> tuple[str, list[str]]:
    """(name, samples) of ``builtin`` or a file: .txt (blank-line separated paragraphs) or .jsonl ({"text": ...})."""
    if str(source) == BUILTIN:
        return BUILTIN_NAME, _paragraphs(BUILTIN_FILE.read_text(encoding="utf-8"))
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"calibration file {path} does not exist; pass --calib builtin or a .txt/.jsonl file")
    if path.suffix.lower() not in (".txt", ".jsonl"):
        raise ConfigError(f"calibration file {path} must be .txt (paragraphs separated by blank lines) or .jsonl "
                          "(one JSON object with a \"text\" field per line)")
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read calibration file {path} as UTF-8 text ({exc})") from exc
    if path.suffix.lower() == ".txt":
        return path.name, _paragraphs(content)
    texts = []
    for n, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise ConfigError(f"{path} line {n} is not valid JSON; each line must be an object with a \"text\" "
                              "field") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ConfigError(f"{path} line {n} has no string \"text\" field")
        texts.append(row["text"])
    return path.name, texts


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def calibration(source: str | Path, tokenizer, samples: int, seq_len: int) -> Calibration:
    """Tokenize up to ``samples`` samples of at most ``seq_len`` tokens; concatenate; cut into ``seq_len`` rows."""
    name, texts = read_texts(source)
    ids: list[int] = []
    accepted = 0
    for text in texts:
        if accepted == samples:
            break
        tokens = tokenizer.encode(text.strip())
        if not tokens or len(tokens) > seq_len:
            continue
        ids.extend(tokens)
        accepted += 1
    rows = len(ids) // seq_len
    if accepted < samples or rows == 0:
        raise ConfigError(f"calibration text {name} is too short: {accepted} usable samples of at most {seq_len} "
                          f"tokens ({len(ids)} tokens) for --samples {samples} --seqlen {seq_len}; give a longer "
                          "file or lower --samples")
    return Calibration(name, accepted, seq_len, torch.tensor(ids[:rows * seq_len], dtype=torch.int64).view(rows, seq_len))
