"""GGUF export: HF Llama-family folder -> GGUF files (F32..Q8_0 and llama-quantize K mixes), and metadata fixes."""

from .export import GGUFResult, export_gguf
from .mixes import QUANT_NAMES

__all__ = ["GGUFResult", "QUANT_NAMES", "export_gguf"]
