"""The description of one architecture family, read by every stage (merge, GGUF, AWQ, quality).

A family is data first (class names, GGUF architecture, flags for the per-tensor transforms) with a few small hooks
(``gguf_hparams``) where a family writes keys of its own. See ``releaser/arch/__init__.py`` for the registry."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import gguf
import numpy as np

from .experts import Experts

STAGES = ("merge", "gguf", "awq", "quality")

# linear layers of one decoder block that read the same input, with the module whose output that input is (AWQ scales
# are folded into it): Llama-style blocks
LLAMA_AWQ_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)
# Gemma 2/3 blocks: the MLP's input is pre_feedforward_layernorm's output (post_attention_layernorm normalizes the
# attention output before the residual add, so no linear reads it)
GEMMA_AWQ_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)
# OLMo 2 blocks have no pre-norms: q/k/v and gate/up read the residual stream, so nothing can absorb their input
# scales (source None: quantized without scaling, clipping only); the linear-to-linear groups are scaled as in Llama
OLMO2_AWQ_GROUPS = (
    (None, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    (None, ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)

# Phi-3 blocks: fused q/k/v (qkv_proj) and gate/up (gate_up_proj), as AutoAWQ's Phi3AWQForCausalLM groups them. A
# third element overrides the group's fields: prev_rows "last": the scales divide only the source's last output rows
# (qkv_proj's v part, which o_proj reads; gate_up_proj's up part, which down_proj reads as act(gate) * up)
PHI3_AWQ_GROUPS = (
    ("input_layernorm", ("self_attn.qkv_proj",)),
    ("self_attn.qkv_proj", ("self_attn.o_proj",), {"prev_rows": "last"}),
    ("post_attention_layernorm", ("mlp.gate_up_proj",)),
    ("mlp.gate_up_proj", ("mlp.down_proj",), {"prev_rows": "last"}),
)


def rope_parameters(config: dict, layer_type: str = "full_attention") -> dict:
    """RoPE settings of ``config`` for one layer type: transformers 5 ``rope_parameters`` (flat, or nested per layer
    type as Gemma 3 has them) over 4.x ``rope_scaling`` and top-level ``rope_theta``; ``rope_type`` always set."""
    rope = dict(config.get("rope_scaling") or {})
    params = config.get("rope_parameters") or {}
    if isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    elif any(isinstance(v, dict) for v in params.values()):
        params = {}
    rope.update(params)
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope["rope_type"] = str(rope.get("rope_type") or rope.get("type") or "default").lower()
    return rope


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> ggml's interleaved RoPE order (what llama.cpp's LlamaModel does to Q and K)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of ``permute_qk`` (ggml interleaved RoPE order -> HF rotate-half order)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class Architecture:
    name: str                                  # family name, e.g. "llama"
    label: str                                 # how users name it, e.g. "Llama"
    classes: tuple[str, ...]                   # config.json "architectures" entries
    model_types: tuple[str, ...]               # config.json "model_type" values
    gguf_arch: gguf.MODEL_ARCH = gguf.MODEL_ARCH.LLAMA
    stages: tuple[str, ...] = STAGES           # the stages that handle this family
    transformers_prefix: str = ""              # class-name prefix in transformers' modeling module (AWQ)
    transformers_module: str = ""              # e.g. "llama" for transformers.models.llama.modeling_llama
    layer_prefix: str = "model.layers."
    embed: str = "model.embed_tokens.weight"
    lm_head: str = "lm_head.weight"
    final_norm: str = "model.norm.weight"
    num_layers_key: str = "num_hidden_layers"
    permute_qk: bool = False                   # GGUF: Q/K rows into ggml's interleaved RoPE order (llama arch)
    norm_shift: float = 0.0                    # GGUF: added to every ``*norm.weight`` (Gemma's RMSNorm is x*(1+w))
    rope_dimension_count: bool = False         # GGUF: write {arch}.rope.dimension_count
    vocab_size_key: bool = False               # GGUF: write {arch}.vocab_size (llama.cpp does for the llama arch)
    awq_groups: tuple = LLAMA_AWQ_GROUPS       # AWQ: (input source, linears sharing that input[, overrides of
    #                                            the group's fields]); only these linears are quantized (norms,
    #                                            routers and embeddings never are); source None: no op to fold
    #                                            scales into, quantized unscaled
    embed_scale: bool = False                  # the embedding output is multiplied by sqrt(hidden_size) (Gemma)
    gguf_vocab: str = "tokenizer.json"         # GGUF tokenizer source, as llama.cpp's converter picks it:
    #                                            "tokenizer.json" (BPE or byte-fallback BPE), "tokenizer.model" (the
    #                                            SentencePiece model, required), "tokenizer.model?" (it when present)
    spm_add_space_prefix: bool | None = None   # GGUF: tokenizer.ggml.add_space_prefix with a SentencePiece vocab
    experts: Experts | None = None             # mixture-of-experts layers: expert tensors, their layouts, the router
    per_layer_config: tuple[str, ...] = ("layer_types", "no_rope_layers")   # merge: config.json lists with an entry
    #                                            per layer, rebuilt from the source layers (a passthrough changes them)
    gguf_dropped: tuple[str, ...] = (".rotary_emb.inv_freq",)   # GGUF: source tensors left out on purpose (name
    #                                            suffixes; llama.cpp computes RoPE frequencies itself)
    gguf_hparams: Callable[[dict, gguf.GGUFWriter], None] | None = field(default=None, compare=False)

    @property
    def awq_linears(self) -> tuple[str, ...]:
        """The linears of one block AWQ quantizes (block-relative names, e.g. ``self_attn.q_proj``)."""
        return tuple(n for _, linears, *_ in self.awq_groups for n in linears)

    def supports(self, stage: str) -> bool:
        return stage in self.stages

    def layer_of(self, name: str) -> int | None:
        m = re.match(re.escape(self.layer_prefix) + r"(\d+)\.", name)
        return int(m.group(1)) if m else None

    def layer_name(self, index: int, suffix: str) -> str:
        return f"{self.layer_prefix}{index}.{suffix}"

    def is_expert(self, name: str) -> bool:
        """An expert's weight, in any layout (a per-layer tensor for merges: experts merge expert by expert)."""
        return self.experts is not None and self.experts.locate(name, self.layer_prefix) is not None

    def is_router(self, name: str) -> bool:
        """The router of an MoE layer (a per-layer tensor; never quantized)."""
        return self.experts is not None and self.experts.is_router(name, self.layer_prefix)

    def is_embedding(self, name: str) -> bool:
        """Vocabulary-sized matrices (rows are tokens)."""
        return name in (self.embed, self.lm_head)

    def tied(self, config: dict, tensor_names) -> bool:
        """True when lm_head shares the input embedding (no separate lm_head tensor)."""
        return self.lm_head not in tensor_names and bool(config.get("tie_word_embeddings", True))

    @property
    def gguf_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def gguf_name_map(self, n_layer: int) -> gguf.TensorNameMap:
        return gguf.get_tensor_name_map(self.gguf_arch, n_layer)

    def permute_heads(self, hf_name: str, config: dict) -> int:
        """Heads to permute the rows of this tensor by for GGUF (0: none)."""
        if not self.permute_qk:
            return 0
        n_head = config["num_attention_heads"]
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return n_head
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return config.get("num_key_value_heads") or n_head
        return 0

    def to_gguf(self, hf_name: str, data: np.ndarray, config: dict) -> np.ndarray:
        """The per-tensor transform from a float32 HF tensor to its GGUF values."""
        heads = self.permute_heads(hf_name, config)
        if heads:
            data = permute_qk(data, heads)
        if self.norm_shift and hf_name.endswith("norm.weight"):
            data = data + np.float32(self.norm_shift)
        return data

    def from_gguf(self, hf_name: str, data: np.ndarray, config: dict) -> np.ndarray:
        """Inverse of ``to_gguf`` (reading a GGUF back under HF names)."""
        if self.norm_shift and hf_name.endswith("norm.weight"):
            data = data - np.float32(self.norm_shift)
        heads = self.permute_heads(hf_name, config)
        return unpermute_qk(data, heads) if heads else data
