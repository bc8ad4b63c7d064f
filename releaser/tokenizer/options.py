"""The tokenizer stage's options: the recipe section ``tokenizer:`` and the flags of ``releaser fix-tokenizer``; the
stop audit's (the recipe section ``stop_audit:``, run by the verify stage)."""

from __future__ import annotations

from pydantic import Field, field_validator

from ..stage import StageOptions


class TokenizerOptions(StageOptions):
    """``tokenizer:`` -- the chat template and stop tokens the main folder must have (``releaser fix-tokenizer``)."""

    template: str = Field(..., description="Built-in chat template name (chatml, llama3, ...) or a .jinja file.")
    eos: str | list[str] | None = Field(None, description="End-of-turn token (default: the template's, else the eos); "
                                        "a list: the end-of-turn token, then more tokens that end generation.")
    system_prompt: str | None = Field(None, description="Default system message.")

    @field_validator("eos")
    @classmethod
    def _eos(cls, value):
        if isinstance(value, list):
            if not value or not all(value):
                raise ValueError("give the end-of-turn token first, then any more stop tokens, e.g. "
                                 "[<|im_end|>, <|endoftext|>]")
            if len(set(value)) != len(value):
                raise ValueError(f"a token is listed twice in {value}")
        return value

    @property
    def end_of_turn(self) -> str | None:
        """The end-of-turn token (the tokenizer's eos): ``eos`` or its first entry."""
        return self.eos[0] if isinstance(self.eos, list) else self.eos

    @property
    def extra_stops(self) -> list[str]:
        """The other tokens that end generation (generation_config.json's eos list, every GGUF's and runtime's)."""
        return list(self.eos[1:]) if isinstance(self.eos, list) else []


class StopAuditOptions(StageOptions):
    """``stop_audit:`` -- sample chat answers from the unquantized model and check how they end (the verify stage)."""

    prompts: str = Field("builtin", description="Chat prompts, one a line: 'builtin' (16 short questions shipped "
                         "with releaser) or a UTF-8 text file.")
    samples: int = Field(16, ge=1, le=256, description="How many prompts to answer (all in one batch).")
    max_tokens: int = Field(256, ge=1, description="Tokens an answer may take before it counts as never ending.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (with llama.cpp's default top-k 40, "
                               "top-p 0.95, min-p 0.05).")
    seed: int = Field(0, ge=0, description="Seed of the sampling.")
    min_ended: float = Field(0.5, ge=0, le=1, description="Share of answers that must end within max_tokens.")
