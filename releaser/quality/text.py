"""The held-out evaluation text and its windows: the built-in public-domain text (see data/SOURCE.md) or a user file,
tokenized once with the unquantized model's tokenizer and cut into windows as llama.cpp's perplexity tool does."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError

DATA = Path(__file__).resolve().parent / "data"
BUILTIN = DATA / "origin_of_species.txt"
BUILTIN_NAME = "Darwin, On the Origin of Species (1859), introduction and chapter I"


@dataclass(frozen=True)
class EvalText:
    name: str      # what the cards and the report call it
    text: str
    sha256: str    # of the UTF-8 text


def read_utf8(path: Path, what: str, fix: str) -> str:
    """The UTF-8 text of the file ``path`` as it is (no newline translation); one-line ConfigErrors naming ``what``
    (e.g. "evaluation text") and, for a missing file, ``fix``."""
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist; {fix}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def load_text(spec: str | Path = "builtin") -> EvalText:
    """``builtin`` (the shipped public-domain text) or the path of a UTF-8 text file."""
    if str(spec) == "builtin":
        path, name = BUILTIN, BUILTIN_NAME
    else:
        path = Path(spec)
        name = path.name
    text = read_utf8(path, "evaluation text", "give a UTF-8 text file or 'builtin'")
    text = text.replace("\r\n", "\n").replace("\r", "\n")   # universal newlines, as open() reads text
    if not text.strip():
        raise ConfigError(f"evaluation text {path} is empty")
    return EvalText(name, text, hashlib.sha256(text.encode()).hexdigest())


@dataclass(frozen=True)
class Windows:
    """``tokens`` [n, ctx]: consecutive, non-overlapping windows of the tokenized text as llama.cpp's perplexity tool
    cuts them: the text is tokenized with BOS in front when the tokenizer adds one, chunk i is tokens [i*ctx,
    (i+1)*ctx) of that, its first token replaced by BOS. Only the second half of each window is scored: the logits at
    positions first..ctx-2 predict the tokens first+1..ctx-1."""

    tokens: torch.Tensor
    ctx: int
    text_tokens: int   # tokens in the whole text

    @property
    def first(self) -> int:
        return self.ctx // 2

    @property
    def count(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def scored_per_window(self) -> int:
        return self.ctx - 1 - self.first

    @property
    def targets(self) -> torch.Tensor:
        """[n, scored] the tokens the scored positions predict."""
        return self.tokens[:, self.first + 1:]

    def head(self, n: int) -> Windows:
        return Windows(self.tokens[:n], self.ctx, self.text_tokens)


def adds_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts one in front of plain text (llama.cpp's add_bos), else None."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if bos is not None and ids and ids[0] == bos else None


def tokenize(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def make_windows(tokenizer, text: EvalText, ctx: int, chunks: int) -> Windows:
    """The first ``chunks`` windows of ``ctx`` tokens (fewer when the text is shorter; an error when not one fits)."""
    if ctx < 8:
        raise ConfigError(f"context size {ctx} is too small; use at least 8 tokens (llama.cpp's default is 512)")
    text_ids = tokenize(tokenizer, text.text)
    bos = adds_bos(tokenizer)
    ids = text_ids if bos is None else [bos, *text_ids]   # llama.cpp: common_tokenize(text, add_special=true)
    n = min(chunks, len(ids) // ctx)
    if n < 1:
        raise ConfigError(f"the evaluation text {text.name!r} has {len(text_ids)} tokens, fewer than one window of "
                          f"{ctx}; use a longer text or a smaller --ctx")
    tokens = torch.tensor(ids[: n * ctx], dtype=torch.long).view(n, ctx)
    if bos is not None:
        tokens[:, 0] = bos
    return Windows(tokens, ctx, len(text_ids))
