"""Gemma 2 and Gemma 3 (text).

Gemma 2: RMSNorm ``x * (1 + w)`` (``+1`` in GGUF), embeddings scaled by sqrt(hidden), four norms per block, a sliding
window on every other layer (the first one sliding), tanh softcapping of the attention logits and of the final
logits, tied embeddings, no QK-norm; llama.cpp reads its SentencePiece ``tokenizer.model`` (never tokenizer.json).

Gemma 3: RMSNorm ``x * (1 + w)`` so every norm weight gets ``+1`` in GGUF, QK-norm, four norms per block,
embeddings scaled by sqrt(hidden) (llama.cpp does that itself), tied embeddings, a sliding-window layer pattern with
its own RoPE base, optional final-logit softcapping."""

from __future__ import annotations

import gguf

from ..errors import ModelError
from .base import GEMMA_AWQ_GROUPS, Architecture


def _gemma2_hparams(config: dict, w: gguf.GGUFWriter) -> None:
    """Gemma2Model.set_gguf_parameters' own keys. llama.cpp's gemma2 graph hard-codes what transformers reads from
    the config (softcapping always on, sliding window on even layers, the query scale from the layer count): a config
    llama.cpp would run differently is refused here, before any file is written."""
    name = "Gemma 2 config.json"
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "sliding_window"):
        if not config.get(key):
            raise ModelError(f"{name} has no {key}; llama.cpp always applies it to Gemma 2 (with its own default), "
                             "so the GGUF would not compute what the model does")
    types = config.get("layer_types")
    n_layer = config["num_hidden_layers"]
    want = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layer)]
    if types is not None and list(types) != want:
        raise ModelError(f"{name} has layer_types {types}; llama.cpp's Gemma 2 has a sliding window on every other "
                         "layer, starting with the first")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    # llama.cpp: 1/sqrt(hidden/heads) for the 46-layer (27B) model, else 1/sqrt(head_dim)
    scalar = config["hidden_size"] // config["num_attention_heads"] if n_layer == 46 else head_dim
    if config.get("query_pre_attn_scalar", head_dim) != scalar:
        raise ModelError(f"{name} has query_pre_attn_scalar {config.get('query_pre_attn_scalar')}; llama.cpp scales a "
                         f"{n_layer}-layer Gemma 2's queries by 1/sqrt({scalar}), so the GGUF would not compute what "
                         "the model does")
    w.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    w.add_final_logit_softcapping(config["final_logit_softcapping"])
    w.add_sliding_window(config["sliding_window"])


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


GEMMA2 = Architecture("gemma2", "Gemma 2", ("Gemma2ForCausalLM",), ("gemma2",), gguf.MODEL_ARCH.GEMMA2,
                      transformers_prefix="Gemma2", transformers_module="gemma2", norm_shift=1.0,
                      embed_scale=True, awq_groups=GEMMA_AWQ_GROUPS, gguf_hparams=_gemma2_hparams,
                      gguf_vocab="tokenizer.model", spm_add_space_prefix=False)

GEMMA3 = Architecture("gemma3", "Gemma 3", ("Gemma3ForCausalLM",), ("gemma3_text",), gguf.MODEL_ARCH.GEMMA3,
                      transformers_prefix="Gemma3", transformers_module="gemma3", norm_shift=1.0,
                      embed_scale=True, awq_groups=GEMMA_AWQ_GROUPS, gguf_hparams=_gemma3_hparams,
                      gguf_vocab="tokenizer.model?", spm_add_space_prefix=False)

FAMILIES = [GEMMA2, GEMMA3]
