"""More serializations of a quantization: compressed-tensors ``pack-quantized`` W4A16 (vLLM, SGLang, transformers)
written from an AWQ folder's own codes, scales and zero points, and MLX affine 4-bit (Apple's mlx-lm) rounded from
the unquantized weights as MLX rounds them."""

from __future__ import annotations

from .options import MLXOptions

__all__ = ["MLXOptions"]
