"""Measured quality of quantized artefacts: perplexity and KL divergence of each GGUF file and AWQ folder against the
unquantized model (llama.cpp's definitions), a JSON report for the cards, and a gate that stops broken quants."""

from .gate import QualityGateError
from .stage import QualityOptions, run_quality

__all__ = ["QualityGateError", "QualityOptions", "run_quality"]
