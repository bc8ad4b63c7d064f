"""Recipe search: a type per tensor that minimises the predicted mean KL divergence within a size budget (``target:
{bpw}`` or ``{size}``), or the size at a KLD target (``{kld}``); the result is an ordinary :class:`QuantSpec` whose
``--tensor-type`` list names every quantized tensor, so llama-quantize makes the same file from it.

The prediction: a tensor ``t`` stored as type ``q`` adds ``alpha[g(t)] * err(t, q)`` to the mean KLD, where
``err`` is the importance-weighted squared error of the quantized weights (sum over rows and columns of
``imatrix[col] * (w - q(w))**2``, the expected squared error of the matrix's output, estimated on a sample of rows)
and ``alpha`` is measured once per tensor group (a role such as attn_v in one third of the layers, the token
embeddings, the output): the KL divergence of the model's next-token distribution when only that group is quantized
to a 4-bit type, divided by the group's error at that type. The measurement runs the unquantized model in float32 on
the importance matrix's calibration conversations (never the quality stage's evaluation text), each probe from the
first layer it changes. The types: per tensor, those whose block fits its rows (the K-quants, IQ1_S, IQ1_M, IQ2_XXS,
IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ4_XS, Q8_0, IQ4_NL and the legacy 32-wide ones; IQ1_S, IQ2_XXS and IQ2_XS only for
tensors the importance matrix has an entry for: llama.cpp cannot make them without). The choice walks up each
tensor's lower convex hull of (bytes, predicted KLD), most KLD saved per byte first (the optimum of the relaxed problem,
within one upgrade of the exact knapsack's), then spends what is left of the budget on the best single move that still
fits.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from ..errors import ConfigError, ModelError
from ..stage import Reporter
from .imatrix_weights import Imatrix
from .mixes import WEIGHTS_REQUIRED, QuantSpec, allows_quantization, tensor_types

CANDIDATES = (T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.Q2_K, T.IQ3_XXS, T.Q3_K, T.IQ3_S, T.IQ4_XS, T.Q4_K,
              T.Q5_K, T.Q6_K, T.Q8_0, T.Q4_0, T.Q4_1, T.IQ4_NL, T.Q5_0, T.Q5_1)
PROBES = (T.Q4_K, T.Q4_0)   # the type a group is measured at: the first its rows take
SAMPLE_ROWS = 128           # rows per tensor the error estimate quantizes
BANDS = 3                   # layer groups per role
CTX, CHUNKS, FIRST = 512, 2, 128   # calibration windows for the probes; positions FIRST.. are scored
SIGNIFICANT = 3             # digits the measured sensitivities are rounded to (thread timing changes the last bits)
# the mix a searched file is labelled with (general.file_type): the one whose base type holds the most weights
LABEL = {T.Q2_K: "Q2_K", T.Q3_K: "Q3_K_M", T.Q4_K: "Q4_K_M", T.Q5_K: "Q5_K_M", T.Q6_K: "Q6_K", T.Q8_0: "Q8_0",
         T.Q4_0: "Q4_0", T.Q4_1: "Q4_1", T.Q5_0: "Q5_0", T.Q5_1: "Q5_1", T.IQ4_XS: "IQ4_XS", T.IQ4_NL: "IQ4_NL",
         T.IQ3_S: "IQ3_S", T.IQ3_XXS: "IQ3_XS", T.IQ2_S: "IQ2_M", T.IQ2_XS: "IQ2_XS", T.IQ2_XXS: "IQ2_XXS",
         T.IQ1_M: "IQ1_M", T.IQ1_S: "IQ1_S"}
TARGETS = ("bpw", "size", "kld")


@dataclass(frozen=True)
class Target:
    kind: str      # bpw (tensor data bits per weight) | size (tensor data bytes) | kld (mean KL divergence)
    value: float

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}" if self.kind != "size" else f"size={self.value / 1e9:g}G"


def parse_target(value, quant: str) -> Target:
    """``{bpw: 4.9}``, ``{size: 2.1G}`` or ``{kld: 0.03}`` -> Target; ConfigError naming the quant otherwise."""
    from ..options import parse_size

    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in TARGETS:
        raise ConfigError(f"GGUF quant {quant}: target is one of {{bpw: 4.9}}, {{size: 2.1G}} or {{kld: 0.03}}; "
                          f"got {value!r}")
    kind, raw = next(iter(value.items()))
    try:
        number = float(parse_size(str(raw))) if kind == "size" else float(raw)
    except (ValueError, TypeError, ConfigError, Exception):   # noqa: BLE001 - parse_size raises OutputError
        number = math.nan
    if not math.isfinite(number) or number <= 0 or (kind == "bpw" and number > 32):
        raise ConfigError(f"GGUF quant {quant}: target {kind} {raw!r} is not a positive number"
                          f"{' of bits per weight (at most 32)' if kind == 'bpw' else ''}")
    return Target(kind, number)


@dataclass
class SearchResult:
    spec: QuantSpec                 # the recipe found (every quantized tensor named in its tensor_types)
    target: Target
    types: dict[str, str]           # GGUF tensor name -> type chosen
    tensor_bytes: int               # all tensor data of the file
    bits_per_weight: float
    predicted_kld: float
    sensitivity: dict[str, float]   # group -> measured mean KLD with only it at its probe type
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)   # type -> tensors
    errors_seconds: float = 0.0     # of ``seconds``: the quantization errors (the rest: the sensitivities)
    reference: dict = field(default_factory=dict)   # llama.cpp's mix of the base's name: its bpw and predicted KLD

    def facts(self) -> dict:
        return {"target": str(self.target), "bits_per_weight": round(self.bits_per_weight, 4),
                "tensor_bytes": self.tensor_bytes, "predicted_kld": round(self.predicted_kld, 6),
                "types": self.counts, "sensitivity": {g: round(k, 6) for g, k in self.sensitivity.items()},
                "seconds": round(self.seconds, 1), "errors_seconds": round(self.errors_seconds, 1),
                "reference": self.reference}


def _nbytes(shape, qtype: T) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def _round(x: float) -> float:
    return float(f"{x:.{SIGNIFICANT}g}")


def _group(name: str, n_layer: int) -> str:
    parts = name.split(".")
    if parts[0] != "blk":
        return parts[0]
    return f"{parts[2]}@{int(parts[1]) * BANDS // n_layer}"


def _takes(q: T, width: int, weighted: bool) -> bool:
    """Whether rows of ``width`` can be stored as ``q`` (its block fits; IQ1_S / IQ2_XXS / IQ2_XS need importance
    weights)."""
    return width % GGML_QUANT_SIZES[q][0] == 0 and (weighted or q not in WEIGHTS_REQUIRED)


def _errors(conv, tensors, imatrix: Imatrix, reporter: Reporter) -> dict[str, dict[T, float]]:
    """Per tensor, per candidate type its rows take: the importance-weighted squared error, estimated from
    SAMPLE_ROWS evenly spaced rows and scaled to all rows. The samples of tensors of one width (and with or without
    importance weights, which change the quantizer) are quantized together, one call per type."""
    from .quants import dequantize, quantize

    batches: dict[tuple, list] = defaultdict(list)
    with reporter.progress("recipe search: sampling rows", len(tensors)) as advance:
        for p in tensors:
            data = conv.read(p).reshape(-1, p.shape[-1])
            rows = np.unique(np.linspace(0, data.shape[0] - 1, min(SAMPLE_ROWS, data.shape[0])).astype(np.int64))
            w = imatrix.for_tensor(p.name, p.shape)
            batches[(p.shape[-1], len(rows), w is None)].append((p, np.ascontiguousarray(data[rows]), w))
            del data
            advance(1)
    out: dict[str, dict[T, float]] = {p.name: {} for p in tensors}
    work = [(key, q) for key in batches for q in CANDIDATES if _takes(q, key[0], not key[2])]
    with reporter.progress("recipe search: quantization errors", len(work)) as advance:
        for (width, n_rows, unweighted), q in work:
            items = batches[(width, n_rows, unweighted)]
            x = np.stack([x for _, x, _ in items])
            w = None if unweighted else np.stack([w for _, _, w in items])
            d = dequantize(quantize(x, q, w), q).reshape(x.shape)
            col = np.ones((len(items), width)) if w is None else w.astype(np.float64)
            per_tensor = np.einsum("trc,tc->t", (x - d).astype(np.float64) ** 2, col)
            for (p, _, _), e in zip(items, per_tensor):
                out[p.name][q] = float(e) * math.prod(p.shape[:-1]) / n_rows
            advance(1)
    return out


class _Probe:
    """The unquantized model on the calibration windows: its reference log-probabilities, and the mean KLD of the
    model with some weights replaced, run from the first decoder layer they change (the reference pass keeps each
    layer's other arguments, and its hidden-state input at the layers in ``starts``)."""

    def __init__(self, model, tokens, starts: set[int]):
        import torch

        self.model, self.tokens, self.torch = model, tokens, torch
        self.layers, self.norm = model.model.layers, model.model.norm
        self.hidden: dict[int, object] = {}
        self.rest: dict[int, tuple] = {}

        def keep(module, args, kwargs, i):
            if args:
                hidden, rest = args[0], args[1:]
            else:
                hidden, rest = kwargs["hidden_states"], ()
                kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if i in starts:
                self.hidden[i] = hidden
            self.rest[i] = (rest, kwargs)

        hooks = [layer.register_forward_pre_hook(lambda m, a, kw, i=i: keep(m, a, kw, i), with_kwargs=True)
                 for i, layer in enumerate(self.layers)]
        try:
            with torch.no_grad():
                self.final = model.model(tokens, use_cache=False).last_hidden_state
        finally:
            for h in hooks:
                h.remove()
        # KLD(ref || q) per position = sum p log p - sum p log q over the entries above the floor (as the quality
        # stage counts them): the first sum and the masked p are computed once
        from ..quality.metrics import LOG_PROB_FLOOR

        ref = self._log_probs(self.final)
        above = ref > LOG_PROB_FLOOR
        self.p = torch.where(above, ref.exp(), 0.0)
        self.entropy = (self.p.double() * torch.where(above, ref, 0.0).double()).sum(-1)
        del ref, above

    def _log_probs(self, hidden):
        torch = self.torch
        with torch.no_grad():
            logits = self.model.lm_head(hidden[:, FIRST:-1]).float()
            cap = getattr(self.model.config, "final_logit_softcapping", None)
            if cap:
                logits = torch.tanh(logits / cap) * cap
            return torch.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)

    def kld(self, start: int | None) -> float:
        """Mean KLD against the reference with the model's current weights, run from decoder layer ``start`` (-1:
        from the tokens; None: only the output head, on the reference's final hidden states)."""
        torch = self.torch
        with torch.no_grad():
            if start is None:
                hidden = self.final
            elif start < 0:
                hidden = self.model.model(self.tokens, use_cache=False).last_hidden_state
            else:
                hidden = self.hidden[start]
                for i in range(start, len(self.layers)):
                    rest, kwargs = self.rest[i]
                    out = self.layers[i](hidden, *rest, **kwargs)
                    hidden = out[0] if isinstance(out, tuple) else out
                hidden = self.norm(hidden)
            cross = torch.sum(self.p * self._log_probs(hidden), dim=-1, dtype=torch.float64)
            return float((self.entropy - cross).mean())


def _calibration(model_dir):
    """[CHUNKS, CTX] token ids of the built-in calibration conversations (the imatrix stage's text)."""
    from ..imatrix.compute import chunk_tokens
    from ..imatrix.text import load_calibration, token_ids
    from ..quality.text import adds_bos
    from ..tokenizer.model import load_tokenizer

    tokenizer = load_tokenizer(model_dir, "the recipe search")
    ids = token_ids(tokenizer, load_calibration("builtin", tokenizer))
    return chunk_tokens(ids, CTX, CHUNKS, adds_bos(tokenizer), "builtin")


def _sensitivities(conv, groups: dict[str, list], errors, imatrix: Imatrix, reporter: Reporter) -> dict[str, float]:
    """Group -> measured mean KLD with only that group's tensors at their probe type."""
    import torch

    from ..quality.load import FolderWeights, build
    from .quants import dequantize, quantize

    family, config = conv.family, conv.config
    with FolderWeights(conv.reader.folder) as weights:
        model = build(weights)
    params = dict(model.named_parameters())
    tokens = _calibration(conv.reader.folder)
    layer_of = {g: min((int(p.name.split(".")[1]) for p in ps if p.name.startswith("blk.")), default=None)
                for g, ps in groups.items()}
    probe = _Probe(model, tokens, {i for i in layer_of.values() if i is not None})
    out = {}
    with reporter.progress("recipe search: sensitivities", len(groups)) as advance:
        for g, ps in groups.items():
            saved = {}
            for p in ps:
                q = next(t for t in PROBES if t in errors[p.name])
                w = imatrix.for_tensor(p.name, p.shape)
                value = dequantize(quantize(conv.read(p), q, w), q).reshape(p.shape)
                hf = params.get(p.source)
                if hf is None:
                    raise ModelError(f"the recipe search cannot find {p.source} among the parameters of "
                                     f"{type(model).__name__}; give tensor_types instead of a target for this model")
                saved[p.source] = hf.data
                hf.data = torch.from_numpy(np.ascontiguousarray(family.from_gguf(p.source, value, config)))
            if g == "output":
                start = None
            elif layer_of[g] is None:   # the token embeddings (and the output too when tied)
                start = -1
            else:
                start = layer_of[g]
            out[g] = probe.kld(start)
            for name, data in saved.items():
                params[name].data = data
            advance(1, description=f"recipe search: sensitivity of {g}")
    return out


def _hull(options: list[tuple[int, float, T]]) -> list[tuple[int, float, T]]:
    """The lower convex hull of (bytes, predicted KLD) from the smallest option: each step buys less KLD per byte."""
    options = sorted(options, key=lambda o: (o[0], o[1]))
    front = []
    for o in options:   # drop options no smaller-or-equal one beats
        if not front or o[1] < front[-1][1]:
            front.append(o)
    hull: list = []
    for o in front:
        while len(hull) >= 2:
            (b0, e0, _), (b1, e1, _) = hull[-2], hull[-1]
            if (e0 - e1) * (o[0] - b1) <= (e1 - o[1]) * (b1 - b0):   # hull[-1] is not below the chord
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def choose(options: dict[str, list[tuple[int, float, T]]], target: Target, fixed_bytes: int,
           params: int) -> dict[str, T]:
    """The type of each tensor (``options``: name -> (bytes, predicted KLD, type) per candidate) for ``target``;
    ``fixed_bytes``: tensor data not searched (norms, ...); ``params``: every tensor's values (for bpw)."""
    hulls = {n: _hull(o) for n, o in options.items()}
    low = fixed_bytes + sum(h[0][0] for h in hulls.values())
    kld_low = sum(h[-1][1] for h in hulls.values())
    if target.kind == "kld" and kld_low > target.value:
        raise ConfigError(f"target KLD {target.value:g} is below what any recipe reaches (predicted {kld_low:.4g} "
                          "with every tensor at its largest type); give a larger target")
    budget = {"bpw": target.value * params / 8, "size": target.value}.get(target.kind)
    if budget is not None and not low <= budget:
        raise ConfigError(f"target {target} is below the smallest recipe ({low * 8 / params:.3f} bpw, "
                          f"{low / 1e9:.3g} GB of tensor data); give a larger target")
    steps = sorted(((h[k][1] - h[k + 1][1]) / (h[k + 1][0] - h[k][0]), n, k)
                   for n, h in hulls.items() for k in range(len(h) - 1))
    steps.reverse()   # most KLD saved per byte first; a tensor's steps come in order (the hull is convex)
    pick = {n: h[0] for n, h in hulls.items()}
    used, kld, blocked = low, sum(h[0][1] for h in hulls.values()), set()
    for _, n, k in steps:
        if target.kind == "kld" and kld <= target.value:
            break
        if n in blocked or pick[n] is not hulls[n][k]:
            blocked.add(n)
            continue
        new = hulls[n][k + 1]
        if budget is not None and used + new[0] - pick[n][0] > budget:
            blocked.add(n)   # its later steps need this one
            continue
        used, kld, pick[n] = used + new[0] - pick[n][0], kld - (pick[n][1] - new[1]), new
    while budget is not None:   # what is left of the budget: the best move of one tensor that still fits
        moves = [(pick[n][1] - o[1], n, o) for n, opts in options.items() for o in opts
                 if o[1] < pick[n][1] and used + o[0] - pick[n][0] <= budget]
        if not moves:
            break
        _, n, o = max(moves, key=lambda m: (m[0], m[1]))
        used, pick[n] = used + o[0] - pick[n][0], o
    return {n: o[2] for n, o in pick.items()}


def _patterns(types: dict[str, T], n_layer: int) -> tuple[tuple[str, str], ...]:
    """llama-quantize --tensor-type patterns naming exactly the tensors of ``types`` (GGUF names): one per role and
    type, anchored (``^blk\\.(0|4)\\.attn_v\\.weight$``; ``\\d+`` when every layer of a role takes it)."""
    by_role: dict[str, dict[T, list[int]]] = defaultdict(lambda: defaultdict(list))
    singles = []
    for name, q in types.items():
        parts = name.split(".")
        if parts[0] == "blk":
            by_role[".".join(parts[2:])][q].append(int(parts[1]))
        else:
            singles.append((f"^{re.escape(name)}$", q.name))
    out = []
    for role, per_type in by_role.items():
        role_rx = re.escape(role)
        for q, layers in sorted(per_type.items(), key=lambda kv: kv[1][0]):
            layers = sorted(layers)
            every = len(per_type) == 1 and layers == list(range(n_layer))
            which = r"\d+" if every else (f"({'|'.join(map(str, layers))})" if len(layers) > 1 else str(layers[0]))
            out.append((f"^blk\\.{which}\\.{role_rx}$", q.name))
    return tuple(singles + out)


def search_recipe(model_dir: str | os.PathLike, spec: QuantSpec, imatrix: Imatrix,
                  reporter: Reporter | None = None) -> SearchResult:
    """The recipe for ``spec.target`` on the model folder ``model_dir`` (see the module docstring)."""
    from ..checkpoint import CheckpointReader
    from .convert import Converter

    reporter = reporter or Reporter()
    start = time.perf_counter()
    target = spec.target
    with CheckpointReader(model_dir) as reader:
        conv = Converter(reader)
        if conv.family.experts is not None:
            raise ConfigError(f"GGUF quant {spec.name}: the recipe search does not handle mixture-of-experts models "
                              "yet; give tensor_types instead of a target")
        searched = [p for p in conv.plan if allows_quantization(p.desc)
                    and any(p.shape[-1] % GGML_QUANT_SIZES[q][0] == 0 for q in CANDIDATES)]
        names = {p.name for p in searched}
        fixed = sum(4 * math.prod(p.shape) if not allows_quantization(p.desc) else 2 * math.prod(p.shape)
                    for p in conv.plan if p.name not in names)   # F32 norms; F16 for rows no quant type takes
        params = sum(math.prod(p.shape) for p in conv.plan)
        if target.kind != "kld":   # a size below every recipe is known from the shapes alone: say so before the work
            choose({p.name: [(_nbytes(p.shape, q), 0.0, q) for q in CANDIDATES
                             if _takes(q, p.shape[-1], imatrix.for_tensor(p.name, p.shape) is not None)]
                    for p in searched}, target, fixed, params)
        reporter.message(f"recipe search for {spec.name} ({target}) over {len(searched)} tensors")
        errors = _errors(conv, searched, imatrix, reporter)
        errors_s = time.perf_counter() - start
        groups: dict[str, list] = defaultdict(list)
        for p in searched:
            groups[_group(p.name, conv.n_layer)].append(p)
        measured = _sensitivities(conv, groups, errors, imatrix, reporter)
    alpha = {}
    for g, ps in groups.items():
        base = sum(errors[p.name][next(t for t in PROBES if t in errors[p.name])] for p in ps)
        alpha[g] = _round(measured[g] / base) if base > 0 else 0.0
    options = {p.name: [(_nbytes(p.shape, q), alpha[_group(p.name, conv.n_layer)] * e, q)
                        for q, e in errors[p.name].items()] for p in searched}
    types = choose(options, target, fixed, params)
    shapes = {p.name: p.shape for p in searched}
    tensor_bytes = fixed + sum(_nbytes(shapes[n], q) for n, q in types.items())
    predicted = sum(alpha[_group(n, conv.n_layer)] * errors[n][q] for n, q in types.items())
    weight = defaultdict(int)
    for n, q in types.items():
        weight[q] += math.prod(shapes[n])
    base = spec.base or LABEL[max(weight, key=weight.get)]
    found = replace(spec, base=base, tensor_types=_patterns(types, conv.n_layer))
    # llama.cpp's own mix of that name, predicted the same way (tensors it gives a type the search has no error for,
    # such as F16, count at no KLD)
    mix = dict(zip((p.name for p in conv.plan), tensor_types([p.desc for p in conv.plan], base, conv.shape, True)))
    reference = {"quant": base, "bits_per_weight": round(sum(_nbytes(p.shape, mix[p.name]) for p in conv.plan) * 8
                                                         / params, 4),
                 "predicted_kld": round(sum(alpha[_group(n, conv.n_layer)] * errors[n].get(mix[n], 0.0)
                                            for n in types), 6)}
    counts = defaultdict(int)
    for q in types.values():
        counts[q.name] += 1
    return SearchResult(found, target, {n: q.name for n, q in types.items()}, tensor_bytes, tensor_bytes * 8 / params,
                        predicted, measured, time.perf_counter() - start, dict(sorted(counts.items())), errors_s,
                        reference)
