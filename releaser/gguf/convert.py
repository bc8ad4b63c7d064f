"""HF Llama-family checkpoint -> GGUF tensors and hyper-parameters (what ``convert_hf_to_gguf.py`` does for
LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM), with gguf-py's tensor-name map and writer."""

from __future__ import annotations

import math
from dataclasses import dataclass

import gguf
import numpy as np
import torch

from ..checkpoint import CheckpointReader, architecture_for
from ..errors import ModelError
from .mixes import ModelShape, TensorDesc

GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}


@dataclass(frozen=True)
class TensorPlan:
    name: str                    # GGUF name
    source: str | None           # HF name (None for generated tensors such as rope_freqs)
    shape: tuple[int, ...]       # numpy order (rows, row length)
    permute_heads: int = 0       # Q/K row permutation with this many heads (0: none)

    @property
    def desc(self) -> TensorDesc:
        return TensorDesc(self.name, self.shape[-1], len(self.shape))


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> ggml's interleaved RoPE order (LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope(config: dict) -> dict:
    rope = dict(config.get("rope_scaling") or {})
    rope.update(config.get("rope_parameters") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return rope


class Converter:
    """Plans and produces the GGUF tensors of one checkpoint; ``read`` returns one float32 tensor at a time."""

    def __init__(self, reader: CheckpointReader):
        self.reader, self.config = reader, reader.config
        self.family = architecture_for(self.config, str(reader.folder))
        c = self.config
        self.gguf_arch = GGUF_ARCH[self.family.name]
        self.n_layer = c["num_hidden_layers"]
        self.n_head = c["num_attention_heads"]
        self.n_head_kv = c.get("num_key_value_heads") or self.n_head
        self.head_dim = c.get("head_dim") or c["hidden_size"] // self.n_head
        self.rope = _rope(c)
        self.name_map = gguf.get_tensor_name_map(self.gguf_arch, self.n_layer)
        self.plan = self._plan()

    @property
    def shape(self) -> ModelShape:
        return ModelShape(self.n_layer, self.n_head, self.n_head_kv, self.family.name)

    def _plan(self) -> list[TensorPlan]:
        permute = self.gguf_arch == gguf.MODEL_ARCH.LLAMA
        plans = []
        for hf_name, info in self.reader.tensors.items():
            if hf_name.endswith(".rotary_emb.inv_freq"):
                continue
            name = self.name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ModelError(f"tensor {hf_name} of {self.reader.folder} has no GGUF name for "
                                 f"{self.family.name}; the checkpoint does not look like a plain {self.family.classes[0]}")
            heads = 0
            if permute and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                heads = self.n_head
            elif permute and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                heads = self.n_head_kv
            plans.append(TensorPlan(name, hf_name, tuple(info.shape), heads))
        if self.rope.get("rope_type", "").lower() == "llama3":
            plans.append(TensorPlan("rope_freqs.weight", None, (self.head_dim // 2,)))

        def order(p: TensorPlan):  # token_embd, blocks in layer order, output_norm, output, extras
            if p.name.startswith("blk."):
                return (1, int(p.name.split(".")[1]))
            return ({"token_embd.weight": 0, "output_norm.weight": 2, "output.weight": 3}.get(p.name, 4), 0)

        return sorted(plans, key=order)

    @property
    def total_params(self) -> int:
        return sum(math.prod(p.shape) for p in self.plan if p.source is not None)

    def read(self, plan: TensorPlan) -> np.ndarray:
        if plan.source is None:
            return self._rope_freqs()
        data = self.reader.read(plan.source).to(torch.float32).numpy()
        if plan.permute_heads:
            data = permute_qk(data, plan.permute_heads)
        return np.ascontiguousarray(data)

    def _rope_freqs(self) -> np.ndarray:  # LlamaModel.generate_extra_tensors for rope_type llama3
        r, dim = self.rope, self.head_dim
        freqs = 1.0 / (r["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        factor, low, high = r.get("factor", 8.0), r.get("low_freq_factor", 1.0), r.get("high_freq_factor", 4.0)
        old = r.get("original_max_position_embeddings", 8192)
        out = []
        for f in freqs.tolist():
            wavelen = 2 * math.pi / f
            if wavelen < old / high:
                out.append(1.0)
            elif wavelen > old / low:
                out.append(factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                out.append(1 / ((1 - smooth) / factor + smooth))
        return np.array(out, dtype=np.float32)

    def add_hparams(self, w: gguf.GGUFWriter) -> None:
        c, r = self.config, self.rope
        w.add_block_count(self.n_layer)
        ctx = c.get("max_position_embeddings") or c.get("n_ctx")
        if ctx:
            w.add_context_length(ctx)
        w.add_embedding_length(c["hidden_size"])
        w.add_feed_forward_length(c["intermediate_size"])
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        rope_type = (r.get("rope_type") or r.get("type") or "default").lower()
        if rope_type == "linear" and r.get("factor"):
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(r["factor"])
        elif rope_type == "yarn" and r.get("factor"):
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(r["factor"])
            w.add_rope_scaling_orig_ctx_len(r["original_max_position_embeddings"])
        elif rope_type not in ("default", "llama3"):
            raise ModelError(f"RoPE type {rope_type!r} in {self.reader.folder}/config.json is not supported by the "
                             "GGUF export (supported: default, linear, yarn, llama3)")
        w.add_rope_freq_base(r["rope_theta"])
        w.add_layer_norm_rms_eps(c.get("rms_norm_eps", 1e-6))
        if c.get("head_dim") is not None:
            w.add_key_length(self.head_dim)
            w.add_value_length(self.head_dim)
        w.add_vocab_size(c["vocab_size"])
        if self.gguf_arch == gguf.MODEL_ARCH.LLAMA:
            w.add_rope_dimension_count(self.head_dim)
