"""Llama and Mistral (HF format): GGUF arch ``llama``, Q/K rows permuted for ggml's RoPE, llama3 ``rope_freqs``."""

from __future__ import annotations

import gguf

from .base import Architecture

LLAMA = Architecture("llama", "Llama", ("LlamaForCausalLM",), ("llama",), gguf.MODEL_ARCH.LLAMA,
                     transformers_prefix="Llama", transformers_module="llama", permute_qk=True,
                     rope_dimension_count=True, vocab_size_key=True)
MISTRAL = Architecture("mistral", "Mistral", ("MistralForCausalLM",), ("mistral",), gguf.MODEL_ARCH.LLAMA,
                       transformers_prefix="Mistral", transformers_module="mistral", permute_qk=True,
                       rope_dimension_count=True, vocab_size_key=True)

FAMILIES = [LLAMA, MISTRAL]
