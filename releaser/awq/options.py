"""The ``awq`` stage's options: the recipe section ``awq:`` and the ``releaser awq`` flags (no torch import here)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ..formats.options import AWQFormat

from ..stage import StageOptions

BUILTIN = "builtin"
CPU_SEARCH_TOKENS = 2048   # on CPU the scale-search loss is measured on this many calibration tokens


class AWQOptions(StageOptions):
    """4-bit AWQ in AutoAWQ's GEMM format (recipe section ``awq:``)."""

    bits: int = Field(4, description="Bits per weight (AWQ GEMM supports 4 only).")
    group_size: Literal[128, 64, 32] = Field(128, description="Weights per quantization group (128, 64 or 32); "
                                             "falls back to 64 or 32 when it does not divide a layer's width.")
    calibration: str = Field(BUILTIN, description="Calibration text: builtin (public-domain English shipped with "
                             "releaser) or a .txt (blank-line separated) / .jsonl (\"text\" field) file.")
    samples: int = Field(128, gt=0, description="Calibration samples (texts of at most seqlen tokens).")
    seqlen: int = Field(512, gt=0, description="Tokens per calibration row.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the search runs: auto, cpu or cuda.")
    formats: list[AWQFormat] = Field(["autoawq"], min_length=1, description="Serializations of the one AWQ pass to "
                                     "release: autoawq (AutoAWQ GEMM, the NAME-AWQ repo) and/or compressed-tensors "
                                     "(pack-quantized W4A16 for vLLM and SGLang, the NAME-W4A16 repo).")
    search_tokens: int | None = Field(None, gt=0, description="Calibration tokens the scale-search loss is measured "
                                      f"on (default: all on GPU, {CPU_SEARCH_TOKENS} on CPU); x-means use all tokens.")

    @field_validator("formats")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"formats {v} names a format twice; list each once")
        return v

    @field_validator("bits")
    @classmethod
    def _four_bits(cls, v: int) -> int:
        if v != 4:
            raise ValueError(f"bits {v} is not supported: the AWQ GEMM format holds 4-bit weights only; use 4")
        return v

