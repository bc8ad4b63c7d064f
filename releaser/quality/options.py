"""The quality stage's options: the recipe section ``quality:`` and the flags of ``releaser eval`` (no heavy imports,
so the CLI can read the flag help without loading torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..stage import StageOptions


class QualityOptions(StageOptions):
    text: str = Field("builtin", description="Evaluation text: 'builtin' (a public-domain English text shipped with "
                      "releaser, never the AWQ calibration text) or a UTF-8 text file.")
    ctx: int = Field(512, ge=8, description="Tokens per window (llama.cpp's -c); the second half of each is scored.")
    chunks: int = Field(8, ge=1, description="Windows to evaluate (llama.cpp's --chunks); fewer if the text is short.")
    time_budget: float | None = Field(None, gt=0, description="Seconds the stage may take: fewer windows are measured "
                                      "(at least one) when the estimate is over it.")
    backend: Literal["torch", "llama.cpp"] = Field("torch", description="Run GGUF files dequantized in torch, or "
                                                   "with llama.cpp itself (needs llama-cpp-python; its default "
                                                   "settings: F16 KV cache, flash attention).")
    numerics: Literal["llama.cpp", "float32"] = Field(
        "llama.cpp", description="The arithmetic the figures describe: 'llama.cpp' (its CPU kernels: each matrix "
        "product's input quantized to the weight type's dot-product format, a float16 KV cache; what "
        "llama-perplexity --kl-divergence measures against an F32 GGUF) or 'float32' (dequantized weights, float32 "
        "activations: the weights' own error only).")
    gate: bool = Field(True, description="Fail when a quant's mean KLD is far above what its type gives, or the Q4 "
                       "file does not stop at the end of a chat turn.")
    max_kld: dict[str, float] = Field(default_factory=dict, description="Mean-KLD limits per quant type overriding "
                                      "the built-in ones, e.g. {Q4_K_M: 0.1, AWQ: 0.2}.")
    stop_test: bool = Field(True, description="Greedy-generate a chat answer from the Q4 artefact; it must end with "
                            "the end-of-turn token.")

    @model_validator(mode="after")
    def _llama_cpp_numerics(self):
        if self.backend == "llama.cpp" and self.numerics != "llama.cpp":
            raise ValueError("the llama.cpp backend computes with llama.cpp's own arithmetic: use numerics "
                             "'llama.cpp' with it, or the torch backend for float32 figures")
        return self

    @field_validator("max_kld")
    @classmethod
    def _limits(cls, value: dict[str, float]) -> dict[str, float]:
        from .gate import DEFAULT_MAX_KLD

        for quant, limit in value.items():
            if quant not in DEFAULT_MAX_KLD:
                from difflib import get_close_matches

                near = get_close_matches(quant.upper(), list(DEFAULT_MAX_KLD), 1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise ValueError(f"unknown quant type {quant!r}; {hint}the types are {', '.join(DEFAULT_MAX_KLD)}")
            if limit < 0:
                raise ValueError(f"{quant}: a KLD limit cannot be negative ({limit:g}); give 0 or more")
        return value
