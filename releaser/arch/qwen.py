"""Qwen2 (q/k/v biases), Qwen3 (QK-norm: ``attn_q_norm``/``attn_k_norm``, no biases) and Qwen3-MoE (Qwen3's attention,
a mixture-of-experts MLP in every layer: a softmax router ``mlp.gate`` choosing ``num_experts_per_tok`` of
``num_experts`` SwiGLU experts, stacked by the GGUF export into ``ffn_{gate,up,down}_exps``, quantized one expert at
a time by AWQ with the router kept); no Q/K permutation."""

from __future__ import annotations

import gguf

from ..errors import ModelError
from .base import Architecture
from .experts import Experts

QWEN2 = Architecture("qwen2", "Qwen2", ("Qwen2ForCausalLM",), ("qwen2",), gguf.MODEL_ARCH.QWEN2,
                     transformers_prefix="Qwen2", transformers_module="qwen2")
# QK-norm weights are per-head RMSNorm weights [head_dim]: they map to attn_{q,k}_norm and need no transform
QWEN3 = Architecture("qwen3", "Qwen3", ("Qwen3ForCausalLM",), ("qwen3",), gguf.MODEL_ARCH.QWEN3,
                     transformers_prefix="Qwen3", transformers_module="qwen3")



def _qwen3moe_hparams(config: dict, w: gguf.GGUFWriter) -> None:
    """The expert keys llama.cpp's Qwen2MoeModel/TextModel write. llama.cpp's qwen3moe graph always renormalizes the
    chosen experts' weights and has an MoE block in every layer: a model that does otherwise is refused."""
    if not config.get("norm_topk_prob", False):
        raise ModelError("Qwen3-MoE with norm_topk_prob false is not supported by the GGUF export: llama.cpp's "
                         "qwen3moe always renormalizes the chosen experts' weights, so it would compute another model")
    step = config.get("decoder_sparse_step", 1) or 1
    if config.get("mlp_only_layers") or step != 1:
        raise ModelError("Qwen3-MoE with dense layers (mlp_only_layers or decoder_sparse_step > 1) is not supported "
                         "by the GGUF export: llama.cpp's qwen3moe has a mixture of experts in every layer")
    experts = QWEN3MOE.experts
    count = experts.count(config)
    if count is None or not config.get(experts.used_key) or not config.get(experts.ff_key):
        raise ModelError(f"Qwen3-MoE config.json needs {' or '.join(experts.count_keys)}, {experts.used_key} and "
                         f"{experts.ff_key}; restore it from the model's original config.json")
    w.add_expert_count(count)
    w.add_expert_used_count(config[experts.used_key])
    w.add_expert_feed_forward_length(config[experts.ff_key])


QWEN3MOE = Architecture("qwen3moe", "Qwen3-MoE", ("Qwen3MoeForCausalLM",), ("qwen3_moe",), gguf.MODEL_ARCH.QWEN3MOE,
                        transformers_prefix="Qwen3Moe",
                        transformers_module="qwen3_moe", experts=Experts(), gguf_hparams=_qwen3moe_hparams)

FAMILIES = [QWEN2, QWEN3, QWEN3MOE]
