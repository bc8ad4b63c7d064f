"""The runtimes stage's options: the recipe section ``runtimes:`` (no torch import here)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from ..stage import StageOptions


class RuntimesOptions(StageOptions):
    """``runtimes:`` -- the files that make each runtime stop and sample as the model folder says (GGUF repos only;
    ``runtimes: false`` turns them all off)."""

    ollama: bool = Field(True, description="Ollama's repo-level params file (stop tokens, sampling defaults) and "
                         "system file (the recipe's system prompt), read by ollama run hf.co/REPO.")
    lmstudio: bool = Field(True, description="An LM Studio model.yaml linking the GGUF repo, with the sampling "
                           "defaults and stop strings.")
    llama_server: bool = Field(True, description="A llama-server models.ini stanza (router mode) in the GGUF card.")

    @model_validator(mode="before")
    @classmethod
    def _all_off(cls, value: Any) -> Any:
        if value is False:
            return {"ollama": False, "lmstudio": False, "llama_server": False}
        if value is True or value is None:
            return {}
        return value

    @property
    def files(self) -> bool:
        """Whether the stage writes any file (the llama-server stanza lives in the card)."""
        return self.ollama or self.lmstudio
