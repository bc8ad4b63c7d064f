"""HF checkpoint -> GGUF tensors and hyper-parameters (what ``convert_hf_to_gguf.py`` does), for every family in
``releaser.arch`` that supports the gguf stage, with gguf-py's tensor-name map and writer. The family description
supplies the GGUF architecture, the per-tensor transforms and its own keys; this module does what all share."""

from __future__ import annotations

import math
from dataclasses import dataclass

import gguf
import numpy as np
import torch

from ..arch import architecture_for, rope_parameters
from ..checkpoint import CheckpointReader
from ..checkpoint.config import check_sizes
from ..errors import ModelError
from .mixes import ModelShape, TensorDesc


@dataclass(frozen=True)
class TensorPlan:
    name: str                    # GGUF name
    source: str | None           # HF name (None for generated tensors such as rope_freqs)
    shape: tuple[int, ...]       # numpy order (rows, row length)

    @property
    def desc(self) -> TensorDesc:
        return TensorDesc(self.name, self.shape[-1], len(self.shape))


class Converter:
    """Plans and produces the GGUF tensors of one checkpoint; ``read`` returns one float32 tensor at a time."""

    def __init__(self, reader: CheckpointReader):
        self.reader, self.config = reader, reader.config
        self.family = architecture_for(self.config, str(reader.folder), stage="gguf")
        c = self.config
        sizes = check_sizes(reader, self.family)   # a missing or wrong size field is one line, before any work
        self.gguf_arch = self.family.gguf_arch
        self.n_layer = sizes[self.family.num_layers_key]
        self.n_head = sizes["num_attention_heads"]
        self.n_head_kv = c.get("num_key_value_heads") or self.n_head
        self.head_dim = c.get("head_dim") or c["hidden_size"] // self.n_head
        self.rope = rope_parameters(c)
        self.name_map = self.family.gguf_name_map(self.n_layer)
        self.plan = self._plan()

    @property
    def shape(self) -> ModelShape:
        experts = self.family.experts
        return ModelShape(self.n_layer, self.n_head, self.n_head_kv, self.family.name,
                          int(experts.count(self.config) or 0) if experts else 0)

    def _plan(self) -> list[TensorPlan]:
        plans = []
        shapes = {n: tuple(i.shape) for n, i in self.reader.tensors.items()}
        experts, names = self.family.experts, list(shapes)
        if experts is not None:   # each layer's experts (any layout) become llama.cpp's stacked ffn_*_exps
            experts.check(self.config, shapes, self.family.layer_prefix, str(self.reader.folder))
            names = experts.as_stacked(names, self.family.layer_prefix)
        self.recipes = {}
        for hf_name in names:
            if hf_name.endswith(self.family.gguf_dropped):
                continue
            name = self.name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ModelError(f"tensor {hf_name} of {self.reader.folder} has no GGUF name for "
                                 f"{self.family.name}; the checkpoint does not look like a plain {self.family.classes[0]}")
            if hf_name not in shapes:
                self.recipes[hf_name] = experts.recipe(hf_name, shapes, self.family.layer_prefix)
            shape = self.recipes[hf_name].shape if hf_name in self.recipes else shapes[hf_name]
            plans.append(TensorPlan(name, hf_name, shape))
        self._check_coverage(plans)
        if self.rope["rope_type"] == "llama3":
            plans.append(TensorPlan("rope_freqs.weight", None, (self.head_dim // 2,)))

        def order(p: TensorPlan):  # token_embd, blocks in layer order, output_norm, output, extras
            if p.name.startswith("blk."):
                return (1, int(p.name.split(".")[1]))
            return ({"token_embd.weight": 0, "output_norm.weight": 2, "output.weight": 3}.get(p.name, 4), 0)

        return sorted(plans, key=order)

    def _check_coverage(self, plans: list[TensorPlan]) -> None:
        """Every tensor llama.cpp needs is produced: each kind of block tensor in every block, the embeddings, the final
        norm, and the output matrix unless the embeddings are tied. (Every source tensor is consumed or named in the
        family's ``gguf_dropped``: ``_plan`` refuses the rest.)"""
        where = f"{self.reader.folder} is incomplete"
        blocks: dict[str, dict[int, str]] = {}
        for p in plans:
            if p.name.startswith("blk."):
                _, index, kind = p.name.split(".", 2)
                blocks.setdefault(kind, {})[int(index)] = p.source
        for kind, layers in sorted(blocks.items()):
            missing = sorted(set(range(self.n_layer)) - set(layers))
            if missing:
                have, source = next(iter(layers.items()))
                name = source.replace(f"{self.family.layer_prefix}{have}.", f"{self.family.layer_prefix}{missing[0]}.")
                raise ModelError(f"{where}: it has no {name} (GGUF blk.{missing[0]}.{kind}), which the other "
                                 "layers have; re-download or re-export the checkpoint")
        names = {p.name for p in plans}
        untied = self.config.get("tie_word_embeddings") is False
        for gguf_name, hf_name in [("token_embd.weight", self.family.embed), ("output_norm.weight",
                                   self.family.final_norm)] + ([("output.weight", self.family.lm_head)] if untied else []):
            if gguf_name not in names:
                raise ModelError(f"{where}: it has no {hf_name} (GGUF {gguf_name}); re-download or re-export the "
                                 "checkpoint")

    @property
    def total_params(self) -> int:
        return sum(math.prod(p.shape) for p in self.plan if p.source is not None)

    def read(self, plan: TensorPlan) -> np.ndarray:
        if plan.source is None:
            return self._rope_freqs()
        recipe = self.recipes.get(plan.source)
        if recipe is None:
            data = self.reader.read(plan.source).to(torch.float32).numpy()
        else:   # one layer's experts of one linear, stacked [n_expert, out, in] in float32
            data = recipe.build(self.reader.read).numpy()
        return np.ascontiguousarray(self.family.to_gguf(plan.source, data, self.config))

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
        rope_type = r["rope_type"]
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
        if self.family.vocab_size_key:
            w.add_vocab_size(c["vocab_size"])
        if self.family.rope_dimension_count:
            w.add_rope_dimension_count(self.head_dim)
        if self.family.gguf_hparams is not None:
            self.family.gguf_hparams(c, w)
