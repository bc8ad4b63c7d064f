"""More serializations of a quantization: compressed-tensors ``pack-quantized`` W4A16 (vLLM, SGLang, transformers)
written from an AWQ folder's own codes, scales and zero points, and MLX affine (Apple's mlx-lm) from the same AWQ codes
or rounded from the unquantized weights as MLX rounds them."""

from __future__ import annotations

from .options import MLXOptions

__all__ = ["MLXOptions"]
