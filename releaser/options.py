"""The options of each release stage: one pydantic model per stage, used as its recipe section and behind its
command-line flags (the CLI builds the same model from the flags, so both are validated the same way)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from .errors import OutputError
from .stage import StageOptions

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


def _size(value: str) -> str:
    """A size such as 5G, checked as the stage reads it (a positive, finite number of bytes)."""
    try:
        parse_size(value)
    except OutputError as exc:
        raise ValueError(str(exc)) from None
    return value


MERGEKIT_KEYS = ("models", "slices", "merge_method", "base_model", "parameters", "dtype", "out_dtype",
                 "tokenizer_source", "tokenizer", "chat_template", "random_seed")


class MergeOptions(StageOptions):
    """``merge:`` -- a mergekit config, inline (the usual mergekit YAML keys) or in a file (``config: path``)."""

    config: str | None = Field(None, description="mergekit YAML file (relative to the recipe's folder).")
    inline: dict[str, Any] | None = Field(None, description="The mergekit config itself (written inline).")
    shard_size: str = Field("5G", description="Maximum bytes per output shard (K/M/G suffixes, powers of 1000).")
    device: str = Field("cpu", description="Where the math runs: cpu, cuda or auto.")

    _size = field_validator("shard_size")(lambda v: _size(v))

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("cpu", "cuda", "auto") and not re.fullmatch(r"cuda:\d+", value):
            raise ValueError(f"unknown device {value!r}; use cpu, cuda (or cuda:N) or auto")
        return value

    @model_validator(mode="before")
    @classmethod
    def _inline_form(cls, data: Any) -> Any:
        if isinstance(data, dict) and "config" not in data and "inline" not in data:
            own = {k: data[k] for k in ("shard_size", "device") if k in data}
            rest = {k: v for k, v in data.items() if k not in own}
            return {**own, "inline": rest}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> MergeOptions:
        if (self.config is None) == (self.inline is None):
            raise ValueError("give the mergekit config inline (models:/slices:, merge_method:, ...) or as config: "
                             "PATH, not both")
        if self.inline is not None:
            unknown = [k for k in self.inline if k not in MERGEKIT_KEYS]
            if unknown:
                from difflib import get_close_matches

                near = get_close_matches(unknown[0], [*MERGEKIT_KEYS, "config", "shard_size", "device"], 1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ValueError(f"unknown key {unknown[0]!r} in the merge config{hint}")
        return self


class TokenizerOptions(StageOptions):
    """``tokenizer:`` -- the chat template and stop tokens the main folder must have (``releaser fix-tokenizer``)."""

    template: str = Field(..., description="Built-in chat template name (chatml, llama3, ...) or a .jinja file.")
    eos: str | None = Field(None, description="End-of-turn token (default: the template's, else the eos).")
    system_prompt: str | None = Field(None, description="Default system message.")


class GGUFOptions(StageOptions):
    """``gguf:`` -- the GGUF files of the ``-GGUF`` repo (``releaser gguf``)."""

    quants: list[str] = Field(default_factory=lambda: ["Q4_K_M"], description="GGUF types, e.g. [Q8_0, Q4_K_M].")
    split_max_size: str | None = Field(None, description="Split files above this size, e.g. 48G.")
    pre_tokenizer: str | None = Field(None, description="llama.cpp BPE pre-tokenizer name (default: detected).")

    _size = field_validator("split_max_size")(lambda v: v if v is None else _size(v))

    @field_validator("quants", mode="before")
    @classmethod
    def _quants(cls, value: Any) -> list[str]:
        from .gguf.mixes import parse_quants

        return parse_quants(value)


class Section(StageOptions):
    """A section of the user's own, rendered as ``## title`` followed by ``body`` (Markdown)."""

    title: str = Field(min_length=1)
    body: str = Field(min_length=1)


class CardOptions(StageOptions):
    """``card:`` -- what the model cards say beyond the facts read from the files."""

    title: str | None = Field(None, description="Card title (default: the repo name).")
    sections: list[Section] = Field(default_factory=list, description="Your own sections, after Usage.")
    template: str | None = Field(None, description="Your own Jinja2 card template (relative to the recipe).")


class Repos(StageOptions):
    """Hub repo ids of the release (defaults: NAME, NAME-GGUF, NAME-AWQ)."""

    main: str | None = None
    gguf: str | None = None
    awq: str | None = None

    _ids = field_validator("main", "gguf", "awq")(check_repo_id)


class PublishOptions(StageOptions):
    target: str = Field("hub", description="Where to publish: hub, or dir:PATH (local folders PATH/OWNER/NAME that "
                                           "mirror the repos).")
    private: bool = Field(False, description="Create missing Hub repos as private (existing repos keep theirs).")
    dry_run: bool = Field(False, description="Plan and show the changes; send and write nothing.")
    create_pr: bool = Field(False, description="Open a pull request per changed repo instead of committing to main.")
    message: str | None = Field(None, description="Commit title (default: 'Release VERSION' or 'Update files').")
    description: str | None = Field(None, description="Commit description (default: the release notes / the plan).")
    keep_stale: bool = Field(False, description="Keep remote files that are no longer in the release folders.")
    include_untracked: bool = Field(False, description="Also send files of the repo folders that no release stage "
                                                       "wrote (default: listed and left out).")
    version: str | None = Field(None, description="Release version; each updated repo is tagged with it.")
    tag: str | None = Field(None, description="Tag name (default: v + version).")
    collection: str | None = Field(None, description="Hub collection (title, in the main repo's namespace) to add "
                                                     "the release's repos to; created if missing.")
    retries: int = Field(5, ge=1, le=20, description="Attempts per commit before giving up.")
    max_wait: float = Field(120.0, gt=0, le=3600, description="Longest wait between attempts, in seconds; a "
                                                              "Retry-After above it ends the run with its wait.")

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        if value != "hub" and not (value.startswith("dir:") and len(value) > 4):
            raise ValueError(f"target must be 'hub' or 'dir:PATH', not {value!r}")
        return value

    @property
    def tag_name(self) -> str | None:
        if self.tag:
            return self.tag
        if self.version:
            return self.version if self.version.startswith("v") else f"v{self.version}"
        return None

    @property
    def commit_title(self) -> str:
        if self.message:
            return self.message
        return f"Release {self.tag_name}" if self.tag_name else "Update files"


class PublishSection(PublishOptions):
    """The recipe's ``publish:``: the publish options (default target: local mirror folders under the work folder)
    and the repo ids."""

    target: str = Field("dir:published", description="dir:PATH (relative to the work folder) or hub.")
    repos: Repos = Field(default_factory=Repos)
