"""OLMo 2 (Olmo2ForCausalLM): no pre-norms. Each block normalizes the *outputs* of attention and of the MLP
(``post_attention_layernorm`` -> llama.cpp's ``post_attention_norm``, ``post_feedforward_layernorm`` ->
``post_ffw_norm``) before the residual add, and has full-width QK-norm (``q_norm`` [heads * head_dim], ``k_norm``
[kv_heads * head_dim], applied before RoPE over all heads at once; no transform). NeoX RoPE: no Q/K permutation.

llama.cpp's ``olmo2`` requires a separate ``output`` tensor, so a config with tied embeddings is refused by the GGUF
export (OLMo 2 releases are untied).

AWQ: q/k/v read the residual stream itself and so do gate/up, with no norm in between: there is no op their input
scales could be folded into, so those linears are quantized without scaling (clipping search only). The two groups
that have a foldable source are scaled as in Llama: ``v_proj -> o_proj`` (when there is no grouped-query attention)
and ``up_proj -> down_proj``."""

from __future__ import annotations

import gguf

from ..errors import ModelError
from .base import OLMO2_AWQ_GROUPS, Architecture


def _olmo2_hparams(config: dict, w: gguf.GGUFWriter) -> None:
    if config.get("tie_word_embeddings"):
        raise ModelError("OLMo 2 with tied embeddings (tie_word_embeddings: true) is not supported by the GGUF export: "
                         "llama.cpp's olmo2 needs a separate output tensor (lm_head.weight)")
    if config.get("sliding_window"):   # Olmo3-style key; OLMo 2 has none (llama.cpp would read a window pattern)
        raise ModelError("OLMo 2 with sliding_window set is not supported by the GGUF export; OLMo 2 has full "
                         "attention in every layer")


OLMO2 = Architecture("olmo2", "OLMo 2", ("Olmo2ForCausalLM",), ("olmo2",), gguf.MODEL_ARCH.OLMO2,
                     transformers_prefix="Olmo2", transformers_module="olmo2", awq_groups=OLMO2_AWQ_GROUPS,
                     gguf_hparams=_olmo2_hparams)

FAMILIES = [OLMO2]
