"""Gemma 3 (text): RMSNorm ``x * (1 + w)`` so every norm weight gets ``+1`` in GGUF, QK-norm, four norms per block,
embeddings scaled by sqrt(hidden) (llama.cpp does that itself), tied embeddings, a sliding-window layer pattern with
its own RoPE base, optional final-logit softcapping."""

from __future__ import annotations

import gguf

from .base import GEMMA_AWQ_GROUPS, Architecture


def _gemma3_hparams(config: dict, w: gguf.GGUFWriter) -> None:
    local = (config.get("rope_parameters") or {}).get("sliding_attention")
    if isinstance(local, dict) and local.get("rope_theta") is not None:
        w.add_rope_freq_base_swa(local["rope_theta"])
    elif config.get("rope_local_base_freq") is not None:            # transformers 4.x
        w.add_rope_freq_base_swa(config["rope_local_base_freq"])
    if config.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(config["final_logit_softcapping"])
    if config.get("sliding_window_pattern") != 1 and config.get("sliding_window"):
        w.add_sliding_window(config["sliding_window"])


GEMMA3 = Architecture("gemma3", "Gemma 3", ("Gemma3ForCausalLM",), ("gemma3_text",), gguf.MODEL_ARCH.GEMMA3,
                      transformers_prefix="Gemma3", transformers_module="gemma3", norm_shift=1.0,
                      embed_scale=True, awq_groups=GEMMA_AWQ_GROUPS, gguf_hparams=_gemma3_hparams)

FAMILIES = [GEMMA3]
