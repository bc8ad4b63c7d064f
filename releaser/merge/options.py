"""The merge stage's options: the recipe section ``merge:`` (and the defaults of ``releaser merge``'s flags)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from ..options import check_size
from ..stage import StageOptions

MERGEKIT_KEYS = ("models", "slices", "merge_method", "base_model", "parameters", "dtype", "out_dtype",
                 "tokenizer_source", "tokenizer", "chat_template", "random_seed")


class MergeOptions(StageOptions):
    """``merge:`` -- a mergekit config, inline (the usual mergekit YAML keys) or in a file (``config: path``)."""

    config: str | None = Field(None, description="mergekit YAML file (relative to the recipe's folder).")
    inline: dict[str, Any] | None = Field(None, description="The mergekit config itself (written inline).")
    shard_size: str = Field("5G", description="Maximum bytes per output shard (K/M/G suffixes, powers of 1000).")
    device: str = Field("cpu", description="Where the math runs: cpu, cuda or auto.")

    _size = field_validator("shard_size")(check_size)

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

    def source(self, folder: str | Path) -> tuple[dict[str, Any] | Path, Path | None]:
        """The config (inline, or the path of its file, relative to ``folder``) and the folder its relative model
        paths are taken from: ``folder`` for an inline config, the file's own folder (None) for a config file."""
        folder = Path(folder)
        return (folder / Path(self.config).expanduser(), None) if self.config is not None else (self.inline, folder)
