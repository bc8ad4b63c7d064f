"""The ``imatrix`` options: the flags of ``releaser imatrix`` and a later recipe section (no torch import here)."""

from __future__ import annotations

from pydantic import Field

from ..stage import StageOptions

BUILTIN = "builtin"


class ImatrixOptions(StageOptions):
    """An importance matrix (llama.cpp's imatrix) computed from the unquantized model in torch."""

    text: str = Field(BUILTIN, description="Calibration text: builtin (chat conversations shipped with releaser, "
                      "rendered through the model's chat template), a .jsonl file (one {\"messages\": [...]} "
                      "conversation or {\"text\": ...} per line) or any other UTF-8 file, read as llama-imatrix -f "
                      "reads it.")
    ctx: int = Field(512, ge=16, description="Tokens per chunk (llama-imatrix's -c).")
    chunks: int | None = Field(None, ge=1, description="Chunks to process (llama-imatrix's --chunks; default: all "
                               "the text holds).")
    process_output: bool = Field(False, description="Also collect output.weight (llama-imatrix's --process-output; "
                                 "models with tied embeddings have none).")
    parse_special: bool = Field(False, description="Read special-token text in a plain text file as the tokens "
                                "(llama-imatrix's --parse-special); conversations rendered by releaser always are.")
