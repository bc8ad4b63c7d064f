"""GGUF export: HF Llama-family folder -> GGUF files (F32..Q8_0 and llama-quantize K mixes), and metadata fixes.

The names are loaded on first use, so that reading the quant names (``releaser.gguf.mixes``, used when a recipe is
validated) does not import torch."""

__all__ = ["GGUFResult", "QUANT_NAMES", "export_gguf"]


def __getattr__(name: str):
    if name in ("GGUFResult", "export_gguf"):
        from . import export

        return getattr(export, name)
    if name == "QUANT_NAMES":
        from .mixes import QUANT_NAMES

        return QUANT_NAMES
    raise AttributeError(name)
