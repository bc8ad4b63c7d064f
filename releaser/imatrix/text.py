"""The calibration text of an importance matrix: the shipped conversations (``builtin``, see data/SOURCE.md) rendered
through the model's own chat template, a .jsonl file of conversations or texts, or a plain text file read as
``llama-imatrix -f`` reads it; and its token ids, as llama-imatrix makes them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .options import BUILTIN

DATA = Path(__file__).resolve().parent / "data"
BUILTIN_FILE = DATA / "chat_calibration.jsonl"
BUILTIN_NAME = "releaser-chat-calibration-v1"   # imatrix.datasets of the builtin text (the template makes the bytes)
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class CalibrationText:
    name: str              # what imatrix.datasets records (a file's name, or BUILTIN_NAME)
    text: str              # exactly what is tokenized
    parse_special: bool    # special-token text in ``text`` is read as the special tokens (rendered chat)
    conversations: int     # rendered through the chat template (0 for a plain text)
    templated: bool        # rendered with the model's chat template (False: no template, plain "User:" turns)

    @property
    def sha256(self) -> str:
        """sha256 of ``text`` as UTF-8: the bytes a ``llama-imatrix -f FILE`` run needs to give the same matrix
        (FILE = the text plus one newline, which -f drops)."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def _conversation(row, where: str) -> list[dict]:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ConfigError(f"{where}: each message needs a role ({', '.join(ROLES)}) and a string content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_jsonl(path: Path) -> list[list[dict] | str]:
    """The rows of a calibration .jsonl: a conversation (``{"messages": [...]}``) or a text (``{"text": ...}``)."""
    rows: list[list[dict] | str] = []
    for n, line in enumerate(_read(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except ValueError:
            raise ConfigError(f"{where} is not valid JSON; each line must be an object with \"messages\" or "
                              "\"text\"") from None
        if isinstance(row, dict) and "messages" in row:
            rows.append(_conversation(row, where))
        elif isinstance(row, dict) and isinstance(row.get("text"), str):
            rows.append(row["text"])
        else:
            raise ConfigError(f"{where} has neither \"messages\" (a conversation) nor a string \"text\"")
    if not rows:
        raise ConfigError(f"calibration file {path} has no rows")
    return rows


def _read(path: Path) -> str:
    from ..quality.text import read_utf8

    return read_utf8(path, "calibration text", "give a text or .jsonl file, or 'builtin'")


def _plain(messages: list[dict]) -> str:
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages)


def render(messages: list[dict], tokenizer) -> str:
    """One conversation through the tokenizer's chat template (a template that refuses a system turn, as Gemma's
    do, gets the system text at the start of the first user turn)."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a Jinja template raises what it likes (raise_exception)
        if messages[0]["role"] != "system" or len(messages) < 2:
            raise
        system, first, *rest = messages
        merged = {"role": first["role"], "content": f"{system['content']}\n\n{first['content']}"}
        return tokenizer.apply_chat_template([merged, *rest], tokenize=False)


def load_calibration(spec: str, tokenizer, parse_special: bool = False) -> CalibrationText:
    """``builtin``, a .jsonl (conversations rendered through the model's chat template, texts as they are) or a
    plain text file (as llama-imatrix -f reads it: one trailing newline dropped)."""
    if str(spec) == BUILTIN:
        path, name = BUILTIN_FILE, BUILTIN_NAME
    else:
        path = Path(spec)
        name = path.name
    if path.suffix.lower() != ".jsonl":
        text = _read(path)
        text = text[:-1] if text.endswith("\n") else text
        if not text.strip():
            raise ConfigError(f"calibration text {path} is empty")
        return CalibrationText(name, text, parse_special, 0, False)
    rows = read_jsonl(path)
    templated = getattr(tokenizer, "chat_template", None) is not None
    pieces, conversations = [], 0
    for row in rows:
        if isinstance(row, str):
            pieces.append(row if row.endswith("\n") else row + "\n\n")
            continue
        conversations += 1
        try:
            pieces.append(render(row, tokenizer) if templated else _plain(row))
        except Exception as exc:  # noqa: BLE001 - see render
            raise ConfigError(f"the model's chat template cannot render conversation {conversations} of {path} "
                              f"({type(exc).__name__}: {exc}); fix the template or give a plain text file") from None
    return CalibrationText(name, "".join(pieces), templated and conversations > 0, conversations, templated)


def token_ids(tokenizer, calib: CalibrationText) -> list[int]:
    """The text's token ids as llama-imatrix makes them (``common_tokenize(text, add_special=true,
    parse_special)``): BOS first when the model's tokenizer adds one."""
    from ..quality.text import adds_bos

    ids = tokenizer(calib.text, add_special_tokens=False, split_special_tokens=not calib.parse_special)["input_ids"]
    bos = adds_bos(tokenizer)
    return ([bos] if bos is not None else []) + list(ids)
