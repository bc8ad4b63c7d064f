"""Options of the format stages (no torch import here): the recipe section ``mlx:`` and ``awq: formats``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..stage import StageOptions

AUTOAWQ = "autoawq"
COMPRESSED_TENSORS = "compressed-tensors"
AWQFormat = Literal["autoawq", "compressed-tensors"]


class MLXOptions(StageOptions):
    """MLX affine quantization as ``mlx_lm.convert -q`` makes it (recipe section ``mlx:``)."""

    bits: Literal[4, 8] = Field(4, description="Bits per weight (4 or 8).")
    group_size: Literal[32, 64, 128] = Field(64, description="Weights per quantization group (32, 64 or 128); a "
                                             "matrix whose width it does not divide stays unquantized, as in mlx-lm.")


class W4A16Options(StageOptions):
    """The compressed-tensors W4A16 stage has no settings of its own: it repacks the AWQ folder's codes."""
