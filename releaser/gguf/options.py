"""The gguf stage's options: the recipe section ``gguf:`` and the flags of ``releaser gguf`` (no torch import here)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from ..options import check_size
from ..stage import StageOptions


class GGUFOptions(StageOptions):
    """``gguf:`` -- the GGUF files of the ``-GGUF`` repo (``releaser gguf``)."""

    quants: list[str] = Field(default_factory=lambda: ["Q4_K_M"], description="GGUF types, e.g. [Q8_0, Q4_K_M].")
    split_max_size: str | None = Field(None, description="Split files above this size, e.g. 48G.")
    pre_tokenizer: str | None = Field(None, description="llama.cpp BPE pre-tokenizer name "
                                         "(default: detected by llama.cpp's hash check).")

    _size = field_validator("split_max_size")(lambda v: v if v is None else check_size(v))

    @field_validator("quants", mode="before")
    @classmethod
    def _quants(cls, value: Any) -> list[str]:
        from .mixes import parse_quants

        return parse_quants(value)
