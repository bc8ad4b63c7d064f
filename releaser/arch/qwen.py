"""Qwen2 (q/k/v biases) and Qwen3 (QK-norm: ``attn_q_norm``/``attn_k_norm``, no biases); no Q/K permutation."""

from __future__ import annotations

import gguf

from .base import Architecture

QWEN2 = Architecture("qwen2", "Qwen2", ("Qwen2ForCausalLM",), ("qwen2",), gguf.MODEL_ARCH.QWEN2,
                     transformers_prefix="Qwen2", transformers_module="qwen2")
# QK-norm weights are per-head RMSNorm weights [head_dim]: they map to attn_{q,k}_norm and need no transform
QWEN3 = Architecture("qwen3", "Qwen3", ("Qwen3ForCausalLM",), ("qwen3",), gguf.MODEL_ARCH.QWEN3,
                     transformers_prefix="Qwen3", transformers_module="qwen3")

FAMILIES = [QWEN2, QWEN3]
