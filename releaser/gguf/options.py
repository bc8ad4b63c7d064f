"""The gguf stage's options: the recipe section ``gguf:`` and the flags of ``releaser gguf`` (no torch import here)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from ..options import check_size
from ..stage import StageOptions


class GGUFOptions(StageOptions):
    """``gguf:`` -- the GGUF files of the ``-GGUF`` repo (``releaser gguf``)."""

    quants: list[str] = Field(default_factory=lambda: ["Q4_K_M"], description="GGUF types, e.g. [Q8_0, Q4_K_M].")
    split_max_size: str | None = Field(None, description="Split files above this size, e.g. 48G.")
    pre_tokenizer: str | None = Field(None, description="llama.cpp BPE pre-tokenizer name "
                                         "(default: detected by llama.cpp's hash check).")

    imatrix: str | None = Field(None, validate_default=True, description="Importance matrix file (llama-imatrix's GGUF or legacy .dat): "
                                   "quantize as llama-quantize --imatrix does (Q2_K_S needs one).")

    _size = field_validator("split_max_size")(lambda v: v if v is None else check_size(v))

    @field_validator("imatrix", mode="before")
    @classmethod
    def _imatrix(cls, value: Any) -> str | None:
        if value is False or value is None:   # `imatrix: false`: none
            return None
        if not isinstance(value, str) or not value.strip() or value.strip() in ("true", "auto"):
            raise ValueError(f"give the path of an importance matrix file (llama-imatrix's .gguf or .dat), or false; "
                             f"got {value!r}")
        return value

    @field_validator("imatrix", mode="after")
    @classmethod
    def _needs_imatrix(cls, value: str | None, info: ValidationInfo) -> str | None:
        from .mixes import NEEDS_IMATRIX

        need = [q for q in info.data.get("quants", []) if q in NEEDS_IMATRIX]
        if need and value is None:
            raise ValueError(f"{', '.join(need)} needs an importance matrix (llama-quantize refuses it without one): "
                             "give one, or use Q2_K")
        return value

    @field_validator("quants", mode="before")
    @classmethod
    def _quants(cls, value: Any) -> list[str]:
        from .mixes import parse_quants

        return parse_quants(value)
