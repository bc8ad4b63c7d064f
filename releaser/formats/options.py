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
    source: Literal["auto", "awq", "rtn"] = Field("auto", description="What the 4-bit matrices come from: awq "
                                                  "(the release's AWQ pass, its codes repacked: its search and "
                                                  "clipping, measured better), rtn (MLX's own rounding of the "
                                                  "unquantized weights, as mlx_lm.convert -q) or auto (awq when the "
                                                  "recipe has an awq: section and bits is 4, else rtn).")
    embedding_bits: Literal[4, 6, 8, 16] = Field(8, description="Bits of the token embedding and the output head "
                                                 "(tied or not; 16 keeps them in float, 4 is mlx_lm.convert -q's "
                                                 "choice): rounding them to 4 bits costs the most quality.")


class W4A16Options(StageOptions):
    """The compressed-tensors W4A16 stage has no settings of its own: it repacks the AWQ folder's codes."""
