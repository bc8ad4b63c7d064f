"""A mixture-of-experts block for AWQ with one ``nn.Linear`` per expert linear (transformers 5 keeps a layer's experts
as fused 3-D parameters, which the scale search, folding and clipping cannot address one expert at a time).

It computes what transformers' sparse MoE block computes (Qwen3-MoE, Qwen2-MoE without shared experts, OLMoE):
router logits, softmax in float32, the top-k experts, their weights renormalized when ``norm_topk_prob``, the chosen
experts' SwiGLU outputs summed with those weights. Its module names are the per-expert checkpoint names
(``experts.{e}.gate_proj``, the router ``gate``), so a block's state loads as it is stored."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..arch.experts import Experts


class ExpertMLP(nn.Module):
    def __init__(self, hidden: int, ff: int, act, linears: tuple[str, ...]):
        super().__init__()
        self.names = linears                                   # (gate, up, down)
        for name, shape in zip(linears, ((ff, hidden), (ff, hidden), (hidden, ff))):
            setattr(self, name, nn.Linear(shape[1], shape[0], bias=False))
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act(gate(x)) * up(x))


class MoEBlock(nn.Module):
    def __init__(self, hf, experts: Experts):
        super().__init__()
        from transformers.activations import ACT2FN

        self.hidden = hf.hidden_size
        self.top_k = getattr(hf, experts.used_key)
        self.norm_topk_prob = bool(getattr(hf, "norm_topk_prob", False))
        n = experts.count(hf.to_dict())
        ff = getattr(hf, experts.ff_key)
        self.router_attr = experts.router.split(".")[-2]       # "gate" of "mlp.gate.weight"
        self.experts_attr = experts.module.split(".")[-1]      # "experts" of "mlp.experts"
        setattr(self, self.router_attr, nn.Linear(self.hidden, n, bias=False))
        setattr(self, self.experts_attr, nn.ModuleList(
            ExpertMLP(self.hidden, ff, ACT2FN[hf.hidden_act], experts.linears) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, self.hidden)
        logits = F.linear(h, getattr(self, self.router_attr).weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(logits.dtype)
        out = torch.zeros_like(h)
        for e, expert in enumerate(getattr(self, self.experts_attr)):
            token, slot = torch.where(chosen == e)
            if token.numel():
                out.index_add_(0, token, expert(h[token]) * weights[token, slot, None])
        return out.reshape(shape)
