"""The release recipe: one YAML file that describes a release (for now: the parts a model card needs).

Later stages extend :class:`Recipe` with their own sections; unknown keys are rejected so a typo is an error.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _check_repo_id(value: str | None) -> str | None:
    if value is not None and not REPO_ID.match(value):
        raise ValueError(f"{value!r} is not a Hub repo id (expected owner/name)")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Section(_Strict):
    """A section of the user's own, rendered as ``## title`` followed by ``body`` (Markdown)."""

    title: str = Field(min_length=1)
    body: str = Field(min_length=1)


class Release(_Strict):
    """One entry of the release history ("What's new"), newest first in the recipe."""

    version: str = Field(min_length=1)
    date: dt.date
    changes: list[str] = Field(min_length=1)


class QuantRepos(_Strict):
    """Hub repo ids of the quantized releases (a repo left out is not published and not linked)."""

    gguf: str | None = None
    awq: str | None = None

    _ids = field_validator("gguf", "awq")(_check_repo_id)


class Recipe(_Strict):
    name: str                               # Hub repo id of the main (merged) model, e.g. alice/Tiny-Merge-1B
    title: str | None = None                # card title; defaults to the repo name
    description: str = Field(min_length=1)  # short description shown under the title
    license: str | None = None              # Hub license id (apache-2.0, mit, llama3.1, other, ...)
    language: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    author: str | None = None               # shown as quantized_by on the quant repos; defaults to the repo owner
    quants: QuantRepos = Field(default_factory=QuantRepos)
    sections: list[Section] = Field(default_factory=list)
    releases: list[Release] = Field(default_factory=list)

    _name = field_validator("name")(_check_repo_id)

    @model_validator(mode="after")
    def _defaults(self) -> "Recipe":
        if self.title is None:
            object.__setattr__(self, "title", self.name.split("/", 1)[1])
        if self.author is None:
            object.__setattr__(self, "author", self.name.split("/", 1)[0])
        return self


def _location(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe YAML file; errors name the file and the YAML path of the bad field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {' '.join(str(exc).split())}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping with at least name: and description:")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        message = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"recipe {path}: {_location(err['loc'])}: {message}") from None
