"""What the stages' options share: Hub repo ids and sizes, validated the same way everywhere. Each stage's options
model lives in its package (``releaser.<stage>.options``); the names below ``__getattr__`` are kept for old imports."""

from __future__ import annotations

import re

from .errors import OutputError

REPO_CHARS = re.compile(r"[A-Za-z0-9._-]+")
REPO_NAME_MAX = 96   # the Hub's limit on the name part


def repo_id_problem(value: object) -> str | None:
    """Why ``value`` is not a repo id the Hub accepts (None when it is one): ``owner/name``, ASCII letters, digits,
    '-', '_' and '.', no part '.'/'..' or starting or ending with '-'/'.', no '--' or '..', no '.git' ending, a name
    of at most 96 characters. Also what ``huggingface_hub.utils.validate_repo_id`` refuses (it alone lets a trailing
    newline, non-ASCII letters or a missing owner pass)."""
    if not isinstance(value, str):
        return "it is not text"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "it contains a control character (a newline or tab)"
    if value.count("/") != 1:
        return "it needs exactly one '/' between owner and name"
    for part in value.split("/"):
        if not part:
            return "the owner and the name cannot be empty"
        bad = REPO_CHARS.sub("", part)
        if bad:
            return f"{bad[0]!r} is not allowed"
        if part in (".", ".."):
            return f"{part!r} is not a name"
        if part[0] in ".-" or part[-1] in ".-":
            return f"{part!r} starts or ends with '-' or '.'"
    if "--" in value or ".." in value:
        return "it contains '--' or '..'"
    if value.endswith(".git"):
        return "it ends with '.git'"
    name = value.split("/")[1]
    if len(name) > REPO_NAME_MAX:
        return f"the name has {len(name)} characters, the Hub allows {REPO_NAME_MAX}"
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as exc:
        return " ".join(str(exc).split())
    return None


def check_repo_id(value: str | None) -> str | None:
    """A pydantic validator: ``value`` (None allowed) is a valid Hub repo id, else a one-line error with the fix."""
    problem = None if value is None else repo_id_problem(value)
    if problem:
        raise ValueError(f"{value!r} is not a valid Hub repo id ({problem}); write OWNER/NAME with letters, digits, "
                         "'-', '_' and '.', e.g. alice/Tiny-Merge-1B")
    return value


def parse_size(text: str | int) -> int:
    """'5GB', '500M', '2G', '1000000' -> bytes (powers of 1000, like mergekit's --out-shard-size)."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().removesuffix("B")
    mult = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}.get(s[-1:], 1)
    try:
        value = int(float(s[:-1] if mult > 1 else s) * mult)
    except (ValueError, OverflowError):   # not a number; inf
        raise OutputError(f"invalid size {text!r}; use a number with an optional K/M/G suffix, e.g. 5G") from None
    if value <= 0:
        raise OutputError(f"invalid size {text!r}; it must be positive")
    return value


def check_size(value: str) -> str:
    """A size such as 5G, checked as the stage reads it (a positive, finite number of bytes)."""
    try:
        parse_size(value)
    except OutputError as exc:
        raise ValueError(str(exc)) from None
    return value


MOVED = {"MergeOptions": "merge", "MERGEKIT_KEYS": "merge", "TokenizerOptions": "tokenizer", "GGUFOptions": "gguf",
         "Section": "card", "CardOptions": "card", "Repos": "publish", "PublishOptions": "publish",
         "PublishSection": "publish"}


def __getattr__(name: str):
    """The options models that lived here before they moved to their stage's package."""
    if name in MOVED:
        import importlib

        return getattr(importlib.import_module(f"releaser.{MOVED[name]}.options"), name)
    raise AttributeError(name)
