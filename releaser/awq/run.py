"""AWQ of a Llama-family checkpoint, one decoder block at a time (transformers' own decoder layers run the forwards).

For each block: load its weights; run it on the calibration hidden states, keeping the inputs of the four scaling
groups and the full-precision outputs (the next block's inputs); search and fold the scales; search and apply the
clipping; quantize and write its linears. Only one block's weights and activations are in memory at a time.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..checkpoint import CheckpointReader, architecture_for
from ..errors import ModelError
from .pack import PACK, pack
from .quantize import choose_group_size, quantize
from .search import apply_clip, fold_into_linear, fold_into_norm, search_clip, search_scale, squared_error

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FUSED_LINEARS = ("self_attn.qkv_proj", "mlp.gate_up_proj")   # Phi-3's fused q/k/v and gate/up
NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.qkv_proj")   # the q.k product makes clipping them
#                                                                          imprecise (AutoAWQ: q_, k_ and fused Wqkv)
CHUNK_TOKENS = 8192                                    # tokens per forward chunk (bounds activation memory)


@dataclass(frozen=True)
class Group:
    """One scaling group: the op the scales fold into, the linears they multiply, and where the loss is measured."""
    prev: str | None          # input_layernorm, self_attn.v_proj, post_attention_layernorm, mlp.up_proj (Llama);
    #                           None: nothing to fold scales into (the group is clipped and quantized unscaled)
    linears: tuple[str, ...]
    inspect: str              # "attn" (whole self-attention, needs whole rows) or "tokens" (token-wise module)
    module: str               # the module whose output the loss compares (self_attn, o_proj, mlp, down_proj)
    feature: str              # captured input: attn_in, o_in, mlp_in, down_in
    source: str = ""          # the module whose input ``feature`` is (default: the first linear)
    scaled: tuple[str, ...] = ()   # linears the scales fold into too, never quantized (an MoE block's router)
    prev_rows: str = "all"    # the prev linear's output rows the scales divide: "all" (they are the group's input)
    #                           or "last" (its last len(s) rows: a fused linear's v part of qkv, up part of gate_up)


GROUPS = (
    Group("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "attn", "self_attn",
          "attn_in"),
    Group("self_attn.v_proj", ("self_attn.o_proj",), "tokens", "self_attn.o_proj", "o_in"),
    Group("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "tokens", "mlp", "mlp_in"),
    Group("mlp.up_proj", ("mlp.down_proj",), "tokens", "mlp.down_proj", "down_in"),
)
FUSED_GROUPS = (   # fused q/k/v and gate/up linears (Phi-3): how their groups are measured
    Group("input_layernorm", ("self_attn.qkv_proj",), "attn", "self_attn", "attn_in"),
    Group("post_attention_layernorm", ("mlp.gate_up_proj",), "tokens", "mlp", "mlp_in"),
)
FEATURE_OF = {"self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
              "self_attn.o_proj": "o_in", "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in",
              "mlp.down_proj": "down_in", "self_attn.qkv_proj": "attn_in", "mlp.gate_up_proj": "mlp_in"}




def family_groups(arch, hf=None) -> tuple[Group, ...]:
    """The scaling groups of ``arch`` (its ``awq_groups``: which op's output the linears read), measured as GROUPS;
    a mixture-of-experts family (``hf``: its transformers config) gets ``moe_groups`` for its MLP. A group whose
    source is None (nothing to fold scales into: OLMo 2's q/k/v and gate/up read the residual stream) is kept with
    prev None: not scaled (``scaling_groups`` leaves it out), its linears still clipped and quantized."""
    by_linears = {g.linears: g for g in (*GROUPS, *FUSED_GROUPS)}
    out = []
    for prev, linears, *fields in arch.awq_groups:
        if arch.experts is not None and linears[0].startswith("mlp."):
            continue
        if tuple(linears) not in by_linears:
            raise ModelError(f"{arch.label}: AWQ has no way to measure the scaling group {', '.join(linears)}")
        out.append(dataclasses.replace(by_linears[tuple(linears)], prev=prev, **(fields[0] if fields else {})))
    if arch.experts is not None:
        out += moe_groups(arch, hf)
    return tuple(out)


def moe_groups(arch, hf) -> list[Group]:
    """An MoE block's groups: every expert's gate and up read the MLP input (the scales fold into the norm before it
    and into the router, which reads it too and stays unquantized; the loss is the whole block's output), and each
    expert's down reads its up's output (measured on the tokens routed to it)."""
    x = arch.experts
    n = x.count(hf.to_dict())
    block = x.module.rsplit(".", 1)[0]                    # "mlp"
    gate, up, down = x.linears
    lin = [[f"{x.module}.{e}.{name}" for name in x.linears] for e in range(n)]
    prev = next(p for p, linears, *_ in arch.awq_groups if linears[0].startswith("mlp."))
    out = [Group(prev, tuple(n for e in range(n) for n in lin[e][:2]), "tokens", block, "mlp_in", source=block,
                 scaled=(x.router.removesuffix(".weight"),))]
    out += [Group(lin[e][1], (lin[e][2],), "tokens", lin[e][2], f"down_in.{e}") for e in range(n)]
    return out


def awq_linears(arch, hf) -> tuple[str, ...]:
    """The linears of one block AWQ quantizes (block-relative names; an MoE block's per expert)."""
    return tuple(n for g in family_groups(arch, hf) for n in g.linears)


@dataclass
class Settings:
    group_size: int
    device: torch.device
    dtype: torch.dtype                 # compute dtype: float32 on CPU, float16 on CUDA
    search_tokens: int | None = None   # tokens the scale-search loss is measured on (None: all)
    clip: bool = True


@dataclass
class BlockReport:
    ratios: dict[str, float] = field(default_factory=dict)   # best grid ratio per scaling group


def family_classes(config: dict, where: str):
    """(decoder layer class, rotary embedding class, norm class, transformers config) of a supported model."""
    arch = architecture_for(config, where, stage="awq")
    prefix, name = arch.transformers_prefix, arch.transformers_module
    module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    from transformers import AutoConfig

    clean = {k: v for k, v in config.items() if k not in ("quantization_config",)}
    hf = AutoConfig.for_model(**clean)
    # sdpa where transformers' own model would use it; eager where it would not (Gemma 2: sdpa drops the attention
    # logit softcapping, so transformers runs Gemma 2 eager)
    pretrained = getattr(module, f"{prefix}PreTrainedModel", None)
    hf._attn_implementation = "sdpa" if getattr(pretrained, "_supports_sdpa", True) else "eager"
    return (getattr(module, f"{prefix}DecoderLayer"), getattr(module, f"{prefix}RotaryEmbedding"),
            getattr(module, f"{prefix}RMSNorm"), hf)


def linear_shapes(hf, arch=None) -> dict[str, tuple[int, int]]:
    """(out, in) of each quantized linear of one block (an MoE block: its first expert's, all are alike)."""
    h = hf.hidden_size
    hd = getattr(hf, "head_dim", None) or h // hf.num_attention_heads
    q, kv, inter = hf.num_attention_heads * hd, hf.num_key_value_heads * hd, hf.intermediate_size
    mlp = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    if arch is not None and arch.experts is not None:
        inter = getattr(hf, arch.experts.ff_key)
        mlp = tuple(f"{arch.experts.module}.0.{n}" for n in arch.experts.linears)
    shapes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, q), mlp[0]: (inter, h), mlp[1]: (inter, h), mlp[2]: (h, inter)}
    if arch is not None and "self_attn.qkv_proj" in arch.awq_linears:   # fused (Phi-3): q, k, v rows in one
        shapes = {"self_attn.qkv_proj": (q + 2 * kv, h), "self_attn.o_proj": (h, q)}
    if arch is not None and "mlp.gate_up_proj" in arch.awq_linears:     # gate rows, then up rows
        shapes = {k: v for k, v in shapes.items() if not k.startswith("mlp.")}
        shapes |= {"mlp.gate_up_proj": (2 * inter, h), "mlp.down_proj": (h, inter)}
    return shapes


def pick_group_size(hf, requested: int, arch=None) -> int:
    shapes = linear_shapes(hf, arch)
    bad = [n for n, (out, _) in shapes.items() if out % PACK]
    if bad:
        raise ModelError(f"{bad[0]} has {shapes[bad[0]][0]} outputs, not a multiple of {PACK}; the AWQ GEMM format "
                         "cannot hold it")
    widths = {"hidden_size": hf.hidden_size, "attention width": shapes["self_attn.o_proj"][1],
              "intermediate_size": next(v for n, v in shapes.items() if n.endswith("down_proj"))[1]}
    return choose_group_size(requested, widths)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for a in range(0, n, size):
        yield slice(a, min(n, a + size))


def channel_abs_mean(x: torch.Tensor) -> torch.Tensor:
    """Per-channel mean of |x| over all tokens, accumulated in float32."""
    flat = x.reshape(-1, x.shape[-1])
    total = torch.zeros(flat.shape[1], dtype=torch.float32, device=x.device)
    for sl in _chunks(flat.shape[0], CHUNK_TOKENS):
        total += flat[sl].float().abs().sum(0)
    return total / flat.shape[0]


def scaling_groups(layer: nn.Module, groups: tuple[Group, ...] = GROUPS) -> list[Group]:
    """The block's scaling groups; v -> o_proj (v_proj, or qkv_proj's v rows) only without grouped-query attention
    (o_proj's input channels are then v's output rows, one for one)."""
    gqa = getattr(layer.self_attn, "num_key_value_groups", 1) != 1
    return [g for g in groups if g.prev is not None and not (gqa and g.linears == ("self_attn.o_proj",))]


def fold_group(layer: nn.Module, group: Group, s: torch.Tensor, norm_shift: float = 0.0) -> None:
    """Divide the preceding norm/linear by s and multiply the group's linears' input columns by s. A norm computing
    ``x * (shift + w)`` (Gemma: shift 1) has its effective weight ``shift + w`` divided."""
    linears = [layer.get_submodule(n) for n in (*group.linears, *group.scaled)]
    prev = layer.get_submodule(group.prev)
    if isinstance(prev, nn.Linear):
        if group.prev_rows == "all" and prev.out_features != s.numel():
            raise ModelError(f"{group.prev} has {prev.out_features} outputs but {group.linears[0]} reads "
                             f"{s.numel()}; its group needs prev_rows 'last' (a fused linear) or no scaling")
        fold_into_linear(prev, linears[0], s)   # the last len(s) rows: all of them, or a fused linear's tail
    elif norm_shift:
        with torch.no_grad():
            prev.weight.add_(norm_shift)
            fold_into_norm(prev, linears, s)
            prev.weight.sub_(norm_shift)
    else:
        fold_into_norm(prev, linears, s)


class BlockRunner:
    """Runs decoder blocks of one model on the calibration hidden states [rows, seq, hidden]."""

    def __init__(self, classes, settings: Settings, seq_len: int, arch=None):
        self.layer_cls, rotary_cls, _, self.hf = classes
        self.s = settings
        self.arch = arch
        self.groups = family_groups(arch, self.hf) if arch is not None else GROUPS
        self.linears = tuple(n for g in self.groups for n in g.linears)
        self.norm_shift = arch.norm_shift if arch is not None else 0.0
        dev = settings.device
        self.rotary = rotary_cls(self.hf).to(dev)
        self.seq_len = seq_len
        self.position_ids = torch.arange(seq_len, device=dev).unsqueeze(0)
        self._kwargs: dict[str, dict] = {}
        self.kwargs = self.layer_kwargs(0)
        self.rows_per_chunk = max(1, CHUNK_TOKENS // seq_len)

    def layer_kwargs(self, index: int) -> dict:
        """The decoder layer's call arguments: RoPE of its layer type (Gemma 3's sliding layers have their own base)
        and, for a sliding-window layer shorter than the rows, the banded causal mask (else plain causal). Eager
        attention (Gemma 2) gets every mask explicitly, additive, as transformers builds it for eager."""
        types = getattr(self.hf, "layer_types", None) or []
        kind = types[index] if index < len(types) else "full_attention"
        if kind not in self._kwargs:
            dev, dt, n = self.s.device, self.s.dtype, self.seq_len
            x = torch.zeros(1, n, 1, device=dev, dtype=dt)
            takes_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
            cos, sin = (self.rotary(x, self.position_ids, kind) if takes_type else self.rotary(x, self.position_ids))
            window = getattr(self.hf, "sliding_window", None)
            banded = kind == "sliding_attention" and window and window < n
            eager = getattr(self.hf, "_attn_implementation", None) == "eager"
            mask = None
            if banded or eager:
                q, k = torch.arange(n, device=dev).view(-1, 1), torch.arange(n, device=dev).view(1, -1)
                allowed = (k <= q) & (q - k < window) if banded else k <= q
                mask = allowed.view(1, 1, n, n)
                if eager:   # eager attention adds the mask to the scores
                    mask = torch.zeros(1, 1, n, n, device=dev, dtype=dt).masked_fill(~mask, torch.finfo(dt).min)
            self._kwargs[kind] = {"attention_mask": mask, "position_ids": self.position_ids,
                                  "position_embeddings": (cos, sin)}
        return self._kwargs[kind]

    def build(self, state: dict[str, torch.Tensor], index: int) -> nn.Module:
        """Block ``index`` with ``state``'s weights; the runner's call arguments become that layer's."""
        self.kwargs = self.layer_kwargs(index)
        with torch.device("meta"):
            layer = self.layer_cls(self.hf, index)
            if self.arch is not None and self.arch.experts is not None:   # one nn.Linear per expert linear
                from .moe import MoEBlock

                layer.set_submodule(self.arch.experts.module.rsplit(".", 1)[0], MoEBlock(self.hf, self.arch.experts))
        state = {k: v.to(self.s.device, self.s.dtype) for k, v in state.items()}
        try:
            layer.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise ModelError(f"block {index}'s tensors do not fit the {type(layer).__name__} layout ({first})") from None
        return layer.eval()

    @torch.no_grad()
    def forward(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(hidden)
        for sl in _chunks(hidden.shape[0], self.rows_per_chunk):
            out[sl] = layer(hidden[sl], **self.kwargs)
        return out

    @torch.no_grad()
    def capture(self, layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The block's full-precision output and each group's input (q_proj's, o_proj's, the MLP's, down_proj's; an
        MoE block's experts' down_proj inputs hold the tokens routed to them, none for an expert no token chose)."""
        where = {g.feature: layer.get_submodule(g.source or g.linears[0]) for g in self.groups}
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in where}
        hooks = [mod.register_forward_pre_hook(lambda m, args, key=key: parts[key].append(args[0].detach()))
                 for key, mod in where.items()]
        try:
            out = self.forward(layer, hidden)
        finally:
            for h in hooks:
                h.remove()
        empty = {k: torch.empty(0, where[k].in_features if isinstance(where[k], nn.Linear) else self.hf.hidden_size,
                                device=hidden.device, dtype=hidden.dtype) for k in where}
        return out, {k: torch.cat(v) if v else empty[k] for k, v in parts.items()}

    # -- the scale search ---------------------------------------------------------------------------------------

    def _loss_fn(self, layer: nn.Module, group: Group, x: torch.Tensor) -> Callable[[], float]:
        """A function measuring the inspected module's output error against its output with the current weights."""
        if group.inspect == "attn":
            attn = layer.self_attn
            rows = x
            if self.s.search_tokens is not None:
                keep = max(1, min(rows.shape[0], self.s.search_tokens // rows.shape[1]))
                rows = rows[torch.linspace(0, rows.shape[0] - 1, keep).round().long()]

            def run(sl):
                return attn(hidden_states=rows[sl], **self.kwargs)[0]
            n, step = rows.shape[0], self.rows_per_chunk
        else:
            mod = layer.get_submodule(group.module)
            tokens = x.reshape(-1, x.shape[-1])
            if self.s.search_tokens is not None and tokens.shape[0] > self.s.search_tokens:
                tokens = tokens[::math.ceil(tokens.shape[0] / self.s.search_tokens)]

            def run(sl):
                return mod(tokens[sl])
            n, step = tokens.shape[0], CHUNK_TOKENS
        with torch.no_grad():
            ref = [run(sl) for sl in _chunks(n, step)]
        count = sum(r.numel() for r in ref)

        def loss() -> float:
            with torch.no_grad():
                total = sum(squared_error(r, run(sl)) for r, sl in zip(ref, _chunks(n, step)))
            return total / count
        return loss

    @torch.no_grad()
    def awq_block(self, layer: nn.Module, feats: dict[str, torch.Tensor]) -> BlockReport:
        """Search all groups' scales on the unscaled block, fold them, then clip (in place)."""
        report = BlockReport()
        gs = self.s.group_size
        found = []
        for g in scaling_groups(layer, self.groups):
            if feats[g.feature].numel() == 0:   # an expert no calibration token chose: nothing to weigh by
                continue
            linears = [layer.get_submodule(n) for n in g.linears]
            s, ratio = search_scale(linears, channel_abs_mean(feats[g.feature]), gs,
                                    self._loss_fn(layer, g, feats[g.feature]))
            found.append((g, s))
            report.ratios[g.prev] = ratio
        scaled: dict[str, torch.Tensor] = {}
        for g, s in found:
            fold_group(layer, g, s, self.norm_shift)
            scaled[g.feature] = s
        if self.s.clip:
            for g in self.groups:
                feat = feats[g.feature]
                if feat.numel() == 0:
                    continue
                for name in g.linears:
                    if name in NO_CLIP:
                        continue
                    x = feat.reshape(-1, feat.shape[-1])
                    step = max(1, x.shape[0] // 512)
                    x = x[::step].float()
                    if g.feature in scaled:
                        x = x / scaled[g.feature].to(x.device).view(1, -1)
                    lin = layer.get_submodule(name)
                    apply_clip(lin, search_clip(lin.weight, x, gs), gs)
        return report


def quantized_tensors(layer: nn.Module, prefix: str, group_size: int,
                      linears: tuple[str, ...] = LINEARS) -> dict[str, torch.Tensor]:
    """The block's output tensors: GEMM qweight/qzeros/scales for the linears, float16 for the rest."""
    out = {}
    linear_weights = {f"{n}.weight" for n in linears}
    for name, t in layer.state_dict().items():
        if name in linear_weights:
            base = prefix + name.removesuffix(".weight")
            q = quantize(t.float(), group_size)
            out[base + ".qweight"] = pack(q.codes.t())
            out[base + ".qzeros"] = pack(q.zeros.t())
            out[base + ".scales"] = q.scales.t().contiguous()
        else:
            out[prefix + name] = t.to(torch.float16)
    return {k: v.cpu().contiguous() for k, v in out.items()}


def output_specs(reader: CheckpointReader, arch, n_layers: int, group_size: int,
                 linears: tuple[str, ...] | None = None) -> list[tuple[str, torch.dtype, tuple]]:
    specs = []
    suffixes = tuple(f".{n}.weight" for n in (linears or arch.awq_linears))
    for name, info in reader.tensors.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        layer = arch.layer_of(name)
        if layer is not None and layer >= n_layers:
            continue
        if layer is not None and name.endswith(suffixes):
            base = name.removesuffix(".weight")
            n, k = info.shape
            specs += [(base + ".qweight", torch.int32, (k, n // PACK)),
                      (base + ".qzeros", torch.int32, (k // group_size, n // PACK)),
                      (base + ".scales", torch.float16, (k // group_size, n))]
        else:
            specs.append((name, torch.float16, tuple(info.shape)))
    return specs


def block_state(reader: CheckpointReader, arch, index: int) -> dict[str, torch.Tensor]:
    prefix = arch.layer_name(index, "")
    return {n.removeprefix(prefix): reader.read(n) for n in reader.tensors
            if n.startswith(prefix) and not n.endswith("rotary_emb.inv_freq")}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        from ..errors import ConfigError

        raise ConfigError("--device cuda was given but torch sees no CUDA GPU; use --device cpu or auto")
    return torch.device(device)


def use_all_cores() -> int:
    """Use every core for torch's CPU kernels, unless the machine is already busier than it has cores (other
    processes): then one thread, because each parallel region would wait for a descheduled thread (measured here:
    small element-wise ops 15-20x slower with 2 threads on 2 oversubscribed cores, matrix products no faster)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = 1 if busy >= n + 1 else n
    torch.set_num_threads(threads)
    return threads
