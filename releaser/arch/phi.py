"""Phi-3 / Phi-4 (Phi3ForCausalLM): fused ``self_attn.qkv_proj`` and ``mlp.gate_up_proj`` kept fused (llama.cpp's
``attn_qkv`` and a double-height ``ffn_up``, as its Phi3MiniModel writes them); NeoX RoPE, so no Q/K permutation;
keys of its own: the original context length, the RoPE dimension count and ``sliding_window`` (0 when none, which
is how llama.cpp tells Phi-4 from Phi-3). Long-rope configs (``long_factor``/``short_factor`` rope factor tensors)
are refused by the GGUF export. Every stage: quality reads the fused tensors back as they are;
AWQ scales them fused, as AutoAWQ does (``PHI3_AWQ_GROUPS``: o_proj's and down_proj's scales divide the v rows of
qkv_proj and the up rows of gate_up_proj)."""

from __future__ import annotations

import gguf

from ..errors import ModelError
from .base import PHI3_AWQ_GROUPS, Architecture, rope_parameters


def _phi3_hparams(config: dict, w: gguf.GGUFWriter) -> None:
    rope = rope_parameters(config)
    if rope.get("long_factor") or rope["rope_type"] not in ("default",):
        raise ModelError(f"Phi-3 RoPE scaling {rope['rope_type']!r} (long-rope factors) is not supported by the "
                         "GGUF export yet; supported: Phi-3/Phi-4 without rope scaling")
    n_head = config["num_attention_heads"]
    rot = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) or 1.0
    w.add_rope_scaling_orig_ctx_len(rope.get("original_max_position_embeddings")
                                    or config.get("original_max_position_embeddings")
                                    or config["max_position_embeddings"])
    w.add_rope_dimension_count(int(rot * config["hidden_size"]) // n_head)
    w.add_sliding_window(config.get("sliding_window") or 0)


PHI3 = Architecture("phi3", "Phi-3", ("Phi3ForCausalLM",), ("phi3",), gguf.MODEL_ARCH.PHI3,
                    transformers_prefix="Phi3", transformers_module="phi3", awq_groups=PHI3_AWQ_GROUPS,
                    gguf_hparams=_phi3_hparams)

FAMILIES = [PHI3]
