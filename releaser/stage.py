"""The stage contract every step of a release follows (merge, tokenizer fix, verify, gguf, awq, quality, cards,
publish).

A stage is a function ``run(options, inputs, out, reporter) -> StageResult``:

- ``options``: a :class:`StageOptions` (pydantic) model; the same model validates the recipe section and the
  command-line flags of the stage's command;
- ``inputs``: the folders/files it reads (never modified);
- ``out``: the output folder, written through :mod:`releaser.atomic` (appears only when complete);
- ``reporter``: where messages and progress go. The library never prints: the CLI passes a rich reporter, library
  users get :class:`Reporter` (silent) or :class:`LoggingReporter`.

The result lists every file the stage wrote with its size and sha256, and a short summary.

Each stage's ``run`` is in its package's ``stage.py`` (``releaser.merge.stage``, ``releaser.tokenizer.stage``,
``releaser.gguf.stage``, ``releaser.awq.stage``, ``releaser.quality.stage``, ``releaser.card.stage``,
``releaser.publish.stage``; verify is ``releaser.tokenizer.verify``) and its options model in that package's
``options.py``. Stage-specific keywords follow ``reporter`` (``overwrite``; ``describe``: how the files are hashed,
:func:`describe_files` or the release manifest's cache). ``releaser.pipeline.stages`` is the table that calls them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict


class StageOptions(BaseModel):
    """Base of every stage's options: unknown keys are errors, values are immutable, numbers are finite (a NaN
    limit would pass every comparison)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @classmethod
    def help(cls, name: str) -> str:
        """The field's description, for the CLI flag that sets it."""
        return cls.model_fields[name].description or ""

    @classmethod
    def default(cls, name: str):
        """The field's default, for the CLI flag that sets it (stated once, here)."""
        return cls.model_fields[name].get_default(call_default_factory=True)

    @classmethod
    def build(cls, **values):
        """The options from command-line values (None: the default), validated as the recipe section is: a bad
        value is a one-line ConfigError naming the option."""
        from pydantic import ValidationError

        from .errors import ConfigError, ReleaserError

        try:
            return cls(**{k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            err = exc.errors()[0]
            cause = (err.get("ctx") or {}).get("error")
            if isinstance(cause, ReleaserError):
                raise cause from None
            where = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"--{where.replace('_', '-')}: {err['msg'].removeprefix('Value error, ')}") from None


class Reporter:
    """Silent reporter (library default). Subclasses show messages and progress."""

    shows_progress = False   # progress() draws bars; the libraries' own bars (Hub uploads) are shown only then

    def message(self, text: str) -> None:
        """A line worth showing (what was done, what was skipped)."""

    def warning(self, text: str) -> None:
        """Something the user should know; the stage goes on."""

    @contextmanager
    def progress(self, description: str, total: float | None = None) -> Iterator[Callable[..., None]]:
        """A progress bar; yields ``advance(n=1, description=None)``."""
        yield lambda n=1, description=None: None


class LoggingReporter(Reporter):
    """Messages to the ``releaser`` logger (progress is not logged)."""

    def __init__(self, logger: logging.Logger | None = None):
        self.log = logger or logging.getLogger("releaser")

    def message(self, text: str) -> None:
        self.log.info(text)

    def warning(self, text: str) -> None:
        self.log.warning(text)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class OutputFile:
    path: str      # relative to the stage's output folder, with forward slashes
    size: int
    sha256: str

    def to_dict(self) -> dict:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


def describe_files(root: str | os.PathLike, paths: Iterable[str | os.PathLike] | None = None) -> list[OutputFile]:
    """Size and sha256 of ``paths`` (default: every file under ``root``, hidden ones excluded), sorted by path."""
    root = Path(root)
    if paths is None:
        paths = [p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".")
                                                                        for part in p.relative_to(root).parts)]
    out = []
    for p in paths:
        p = Path(p)
        full = p if p.is_absolute() else root / p
        out.append(OutputFile(full.relative_to(root).as_posix(), full.stat().st_size, sha256_file(full)))
    return sorted(out, key=lambda f: f.path)


@dataclass
class StageResult:
    stage: str
    output: Path
    files: list[OutputFile]
    summary: str
    facts: dict = field(default_factory=dict)   # stage-specific, JSON-serialisable (e.g. tensor types, figures)

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)
