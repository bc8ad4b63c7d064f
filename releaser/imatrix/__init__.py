"""Importance matrices (llama.cpp's imatrix): computed from a Hugging Face folder in torch (``compute``), read, merged
and written in llama.cpp's GGUF and legacy .dat formats (``file``), and the stage (``stage``)."""

from .file import Imatrix, merge, read, read_imatrix, write

__all__ = ["Imatrix", "merge", "read", "read_imatrix", "write"]
