"""The tokenizer stage's options: the recipe section ``tokenizer:`` and the flags of ``releaser fix-tokenizer``."""

from __future__ import annotations

from pydantic import Field

from ..stage import StageOptions


class TokenizerOptions(StageOptions):
    """``tokenizer:`` -- the chat template and stop tokens the main folder must have (``releaser fix-tokenizer``)."""

    template: str = Field(..., description="Built-in chat template name (chatml, llama3, ...) or a .jinja file.")
    eos: str | None = Field(None, description="End-of-turn token (default: the template's, else the eos).")
    system_prompt: str | None = Field(None, description="Default system message.")
