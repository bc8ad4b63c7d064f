"""Measured quality of quantized artefacts: perplexity and KL divergence of each GGUF file and AWQ, W4A16 or MLX
folder against the unquantized model (llama.cpp's definitions), a JSON report for the cards, and a gate that stops broken quants."""

from .gate import QualityGateError
from .options import QualityOptions

__all__ = ["QualityGateError", "QualityOptions", "run_quality"]


def __getattr__(name: str):
    if name == "run_quality":  # imported on use: the stage needs torch and transformers, the CLI's help does not
        from .stage import run_quality

        return run_quality
    raise AttributeError(name)
