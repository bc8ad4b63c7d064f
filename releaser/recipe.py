"""The release recipe: one YAML file that describes a whole release (``releaser release``, ``releaser check``) and
what the model cards say (``releaser card --recipe``). Each section is its stage's options model, from the stage's
package; this module only assembles them. Unknown keys are errors that name the key, its YAML path and
the closest valid key.
"""

from __future__ import annotations

import datetime as dt
import difflib
import os
import types
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .awq.options import AWQOptions
from .card.options import CardOptions, Section
from .errors import ConfigError
from .formats.options import AUTOAWQ, COMPRESSED_TENSORS, MLXOptions
from .gguf.options import GGUFOptions
from .imatrix.options import ImatrixOptions
from .merge.options import MergeOptions
from .options import check_repo_id, repo_id_problem
from .publish.options import PublishSection
from .quality.options import QualityOptions
from .runtimes.options import RuntimesOptions
from .tokenizer.options import StopAuditOptions, TokenizerOptions

_check_repo_id = check_repo_id


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Release(_Strict):
    """One entry of the release history ("What's new"), newest first in the recipe."""

    version: str = Field(min_length=1)
    date: dt.date
    changes: list[str] = Field(min_length=1)


class QuantRepos(_Strict):
    """Hub repo ids of the quantized releases (a repo left out is not published and not linked)."""

    gguf: str | None = None
    awq: str | None = None
    w4a16: str | None = None
    mlx: str | None = None

    _ids = field_validator("gguf", "awq", "w4a16", "mlx")(_check_repo_id)


class ExecutorSection(_Strict):
    """Where a release's tasks run (``--executor``, ``--ray-address`` override it): local (this process) or ray (a Ray
    cluster at ``address``; None: RAY_ADDRESS, or a Ray started on this machine). Not part of any fingerprint: the
    bytes are the same."""

    kind: typing.Literal["local", "ray"] = "local"
    address: str | None = None


class Recipe(_Strict):
    name: str                               # Hub repo id of the main model, e.g. alice/Tiny-Merge-1B
    version: str | None = None              # release version (default: the newest releases: entry, else 1.0)
    description: str = Field(min_length=1)  # short description shown under the title
    license: str | None = None              # Hub license id (apache-2.0, mit, llama3.1, other, ...)
    language: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    author: str | None = None               # shown as quantized_by on the quant repos; defaults to the repo owner
    merge: MergeOptions | None = None       # a mergekit config (inline or config: PATH) ...
    model: str | None = None                # ... or an existing model folder to release (re-upload fixed weights)
    tokenizer: TokenizerOptions | None = None
    stop_audit: StopAuditOptions | typing.Literal[False] = Field(default_factory=StopAuditOptions)   # false: none
    gguf: GGUFOptions | None = None
    imatrix: ImatrixOptions | None = None   # how gguf.imatrix auto is computed (text, ctx, chunks)
    runtimes: RuntimesOptions = Field(default_factory=RuntimesOptions)   # the GGUF repo's runtime files
    awq: AWQOptions | None = None           # the -AWQ repo (4-bit AutoAWQ GEMM) and/or -W4A16 (awq.formats)
    mlx: MLXOptions | None = None           # the -MLX-4bit repo (MLX affine); left out: no MLX release
    quality: QualityOptions | typing.Literal[False] = Field(default_factory=QualityOptions)   # false: not measured
    card: CardOptions = Field(default_factory=CardOptions)
    releases: list[Release] = Field(default_factory=list)
    publish: PublishSection = Field(default_factory=PublishSection)
    executor: ExecutorSection = Field(default_factory=ExecutorSection)

    _name = field_validator("name")(_check_repo_id)

    @model_validator(mode="after")
    def _defaults(self) -> "Recipe":
        if self.author is None:
            object.__setattr__(self, "author", self.name.split("/", 1)[0])
        if self.version is None:
            object.__setattr__(self, "version", self.releases[0].version if self.releases else "1.0")
        if self.imatrix is not None and (self.gguf is None or self.gguf.imatrix != "auto"):
            raise ValueError("imatrix: says how the release computes its importance matrix, which it does only for "
                             "gguf: {imatrix: auto}; set that, or drop the imatrix: section")
        if self.mlx is not None and self.mlx.source == "awq":
            if self.awq is None:
                raise ValueError("mlx.source awq repacks the AWQ pass's codes, and the recipe has no awq: section; "
                                 "add one (awq: {} for the defaults) or set mlx.source rtn")
            if self.mlx.bits != 4:
                raise ValueError(f"mlx.source awq gives 4-bit weights, and mlx.bits is {self.mlx.bits}; set bits 4 "
                                 "or source rtn")
        derived_ids = self._derived()
        for section, derived in derived_ids.items():
            if derived is not None and getattr(self.publish.repos, section) is None:
                problem = repo_id_problem(derived)
                if problem:
                    raise ValueError(f"name: the {section} repo id made from it, {derived!r}, is not valid ({problem});"
                                     f" shorten name or set publish.repos.{section}")
        return self

    # what the cards read
    @property
    def title(self) -> str:
        return self.card.title or self.name.split("/", 1)[1]

    @property
    def sections(self) -> list[Section]:
        return list(self.card.sections)

    def _derived(self) -> dict[str, str | None]:
        """The quant repo ids made from the name for what the recipe makes (None: not made). W4A16 is the scheme name
        llm-compressor (whose output format compressed-tensors is) and vLLM's docs give 4-bit weights with 16-bit
        activations, and what its users search for; MLX repos say MLX and the bits, as mlx-community's do."""
        formats = self.awq.formats if self.awq is not None else []
        return {"gguf": f"{self.name}-GGUF" if self.gguf is not None else None,
                "awq": f"{self.name}-AWQ" if AUTOAWQ in formats else None,
                "w4a16": f"{self.name}-W4A16" if COMPRESSED_TENSORS in formats else None,
                "mlx": f"{self.name}-MLX-{self.mlx.bits}bit" if self.mlx is not None else None}

    @property
    def quants(self) -> QuantRepos:
        """The quant repos to link: given in publish.repos, or named NAME-GGUF, NAME-AWQ, NAME-W4A16, NAME-MLX-4bit
        when the recipe makes them."""
        repos = self.publish.repos
        made = self._derived()
        return QuantRepos(**{k: getattr(repos, k) or v for k, v in made.items()})

    @property
    def mlx_source(self) -> str | None:
        """Where the MLX weights come from: "awq" (the AWQ pass's codes) or "rtn" (MLX's rounding of the main
        folder); None without an mlx: section."""
        m = self.mlx
        if m is None:
            return None
        if m.source == "auto":
            return "awq" if self.awq is not None and m.bits == 4 else "rtn"
        return m.source

    @property
    def main_repo(self) -> str:
        return self.publish.repos.main or self.name

    def require_source(self) -> None:
        """A release needs exactly one of merge: and model:."""
        if (self.merge is None) == (self.model is None):
            raise ConfigError("the recipe needs exactly one of merge: (a mergekit config to run) and model: (an "
                              "existing model folder to release)" + (", not both" if self.merge else ""))


def _field_model(annotation) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as ``X | None`` or ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, (types.UnionType, typing._GenericAlias)) or typing.get_origin(annotation):
        for arg in typing.get_args(annotation):
            found = _field_model(arg)
            if found is not None:
                return found
    return None


MOVED = {"title": "card.title", "sections": "card.sections", "quants": "publish.repos"}  # keys of releaser <= 0.1


def _closest(loc: tuple) -> str:
    """For an unknown key at ``loc``: '; did you mean X?' with the closest valid key of the enclosing section."""
    if len(loc) == 1 and loc[0] in MOVED:
        return f"; it is now {MOVED[loc[0]]}"
    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        model = _field_model(field.annotation) if field else None
    if model is None:
        return ""
    near = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), 1, 0.5)
    return f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(model.model_fields)}"


def _union_tag(part) -> bool:
    """Parts pydantic adds to an error's location for the branches of a union (``quality: QualityOptions | false``)."""
    return isinstance(part, str) and (part.endswith("Options") or part.startswith(("function-after[", "literal[")))


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
        loc = tuple(p for p in err["loc"] if not _union_tag(p))
        if err["type"] == "extra_forbidden":
            message = f"unknown key {loc[-1]!r}{_closest(loc)}"
        elif err["type"] == "finite_number":
            message = f"{err['input']!r} is not a finite number (NaN and infinity are refused); give a number"
        else:
            message = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"recipe {path}: {_location(loc)}: {message}") from None
