"""Vocabulary alignment for ``tokenizer_source: base | union | <model>`` (mergekit 0.1.5 semantics).

The output tokenizer is built first; each model's embedding and lm_head rows are then permuted into the output's token
order. A model that lacks a token gets, for that row: the only owner's row when one model has the token, a zero row
when none has it, the base model's row when the base has it, otherwise the mean of the owners' rows. The merge method
then merges these aligned matrices like any other tensor.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, ModelError


@dataclass
class TokenOverride:
    """An explicit embedding for one output token (the ``tokens:`` of mergekit's ``tokenizer:`` block)."""

    model: int | None                       # model whose row is used (None: a zero row)
    row: int | None                         # that model's row id
    force: bool                             # also replace the row of models that have the token


@dataclass
class VocabAlignment:
    tokenizer: object                       # transformers tokenizer of the output
    size: int                               # rows of the output embedding (the vocabulary, padded)
    perms: dict[int, torch.Tensor]          # model index -> [vocabulary] original row id, or -1 when missing
    identity: bool                          # every model already has the output's rows in order
    folder: str | None                      # copy the tokenizer files from here (None: save ``tokenizer``)
    overrides: dict[int, TokenOverride] = field(default_factory=dict)   # output token id -> explicit source
    vocabs: list[dict[str, int]] = field(default_factory=list)          # each model's own vocabulary
    sizes: list[int] = field(default_factory=list)                      # each model's embedding rows

    def align(self, tensors: list[torch.Tensor], models: list[int], base_pos: int | None) -> list[torch.Tensor]:
        if self.identity and not self.overrides:
            return tensors
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        perms = [self.perms[m] for m in models]
        has = torch.stack([p >= 0 for p in perms])                        # [models, vocabulary]
        rows = [t.to(dtype)[p.clamp(min=0)] for t, p in zip(tensors, perms)]
        explicit = torch.zeros(has.shape[1], dtype=torch.bool)
        forced = torch.zeros_like(explicit)
        for token_id, o in self.overrides.items():
            explicit[token_id] = True
            forced[token_id] = o.force
        need = ~has.all(0) & ~explicit
        count = has.sum(0)
        default = torch.zeros_like(rows[0])
        idx = need.nonzero().squeeze(1)
        if len(idx):
            acc = torch.zeros_like(rows[0][idx])
            for r, h in zip(rows, has):
                acc = acc + torch.where(h[idx].unsqueeze(1), r[idx], 0)   # owners only, in model order
            fill = acc / count[idx].clamp(min=1).to(dtype).unsqueeze(1)
            fill = torch.where((count[idx] == 1).unsqueeze(1), acc, fill)  # a single owner's row, as is
            if base_pos is not None:
                base_has = has[base_pos, idx] & (count[idx] > 1)
                fill = torch.where(base_has.unsqueeze(1), rows[base_pos][idx], fill)
            default[idx] = fill
        for token_id, o in self.overrides.items():
            if not (o.force or not has[:, token_id].all()) or o.model is None:
                continue
            if o.model not in models:
                raise ModelError(f"tokenizer.tokens: the row for token id {token_id} comes from a model that is not "
                                 "an input of this tensor; use one of the merged models as its source")
            default[token_id] = tensors[models.index(o.model)].to(dtype)[o.row]
        keep = has & ~forced
        out = [torch.where(k.unsqueeze(1), r, default) for r, k in zip(rows, keep)]
        if self.size > has.shape[1]:   # pad_to_multiple_of: extra rows are the mean of the real ones
            out = [torch.cat([o, torch.mean(o, dim=0, keepdim=True).expand(self.size - o.shape[0], *o.shape[1:])])
                   for o in out]
        return out


def _load_tokenizer(folder: str):
    from ..tokenizer.model import load_tokenizer

    return load_tokenizer(folder, "tokenizer_source")


def _vocab_size(config: dict, tokenizer) -> int:
    return int(config.get("vocab_size") or len(tokenizer.get_vocab()))


def _stripped(tokenizer, vocab_size: int):
    """The tokenizer without tokens whose id is >= the model's embedding rows (BPE fast tokenizers)."""
    unused = {tok for tok, i in tokenizer.get_vocab().items() if i >= vocab_size}
    if not unused:
        return tokenizer
    import tokenizers

    data = json.loads(tokenizer._tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise ModelError(f"the base tokenizer has tokens beyond the embedding ({vocab_size} rows) and is not BPE; "
                         "use a model folder as tokenizer_source")
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < vocab_size]
    for tok in unused:
        data["model"]["vocab"].pop(tok, None)

    def keep(merge) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else merge
        return not any(p in unused for p in parts)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tokenizer


def _union(base_tok, toks: list, sizes: list[int]):
    vocab: dict[str, None] = {}
    added: dict[str, object] = {}
    for tok, size in zip(toks, sizes):
        decoder = tok.added_tokens_decoder
        added_names = {info.content for info in decoder.values()}
        for name, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < size and name not in added_names:
                vocab.setdefault(name, None)
        for i, info in decoder.items():
            if i < size:
                added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as tmp:   # a fresh copy, so the base tokenizer is not mutated
        base_tok.save_pretrained(tmp)
        out = _load_tokenizer(tmp)
    base_vocab = base_tok.get_vocab()
    for name in vocab:
        if name not in added and name not in base_vocab:
            out.add_tokens(name)
    for info in added.values():
        out.add_tokens(info)
    return out


def build_alignment(source: str, models: list[str], configs: list[dict], base: int, *, add_tokens=(),
                    pad_to_multiple_of: int | None = None) -> VocabAlignment:
    """Build the output tokenizer for ``tokenizer_source`` (plus ``add_tokens``) and each model's row permutation."""
    toks = [_load_tokenizer(m) for m in models]
    sizes = [_vocab_size(c, t) for c, t in zip(configs, toks)]
    full = len(toks[base].get_vocab())
    toks[base] = _stripped(toks[base], sizes[base])
    folder = None
    if source == "base":
        out = toks[base]
        folder = models[base] if len(out.get_vocab()) == full else None
    elif source == "union":
        out = _union(toks[base], toks, sizes)
    else:
        if not Path(source).is_dir():
            raise ConfigError(f"`tokenizer_source` {source} is neither base, union nor a model folder")
        out, folder = _load_tokenizer(source), source
    existing = set(out.get_vocab())
    for token in add_tokens:
        if token not in existing:
            out.add_tokens(token)
            existing.add(token)
            folder = None   # the tokenizer changed: save it instead of copying files
    vocab_out = out.get_vocab()
    size = len(vocab_out)
    perms, identity = {}, True
    for m, (tok, n) in enumerate(zip(toks, sizes)):
        own = tok.get_vocab()
        perm = torch.full((size,), -1, dtype=torch.long)
        for name, new_id in vocab_out.items():
            old = own.get(name, -1)
            if 0 <= old < n:
                perm[new_id] = old
        perms[m] = perm
        identity &= n == size and bool((perm == torch.arange(size)).all())
    rows = size
    if pad_to_multiple_of and size % pad_to_multiple_of:
        rows = (size // pad_to_multiple_of + 1) * pad_to_multiple_of
        identity = False
    return VocabAlignment(out, rows, perms, identity, folder, vocabs=[t.get_vocab() for t in toks], sizes=sizes)


def set_token_sources(alignment: VocabAlignment, tokens: dict, model_index, label) -> None:
    """Resolve the ``tokens:`` settings of a ``tokenizer:`` block into explicit rows. ``model_index(ref)`` maps a model
    reference to its index (raising for a model that is not merged); ``label(i)`` names model ``i``."""
    vocab_out = alignment.tokenizer.get_vocab()
    for token, setting in tokens.items():
        where = f"`tokenizer.tokens.{token}.source`"
        token_id = vocab_out[token]
        source = setting.source
        if source is None:
            continue   # no explicit source: the automatic rules apply (force has nothing to use)
        if getattr(source, "kind", None) == "zero":
            alignment.overrides[token_id] = TokenOverride(None, None, setting.force)
            continue
        model = model_index(source if isinstance(source, str) else source.model, where)
        if isinstance(source, str):
            row = int(alignment.perms[model][token_id])
            if row < 0:
                raise ConfigError(f"{where}: {label(model)} does not have the token {token!r}; name a model that "
                                  "has it, or use {kind: model_token, model, token}")
        elif source.token_id is not None:
            row = source.token_id
            if not 0 <= row < alignment.sizes[model]:
                raise ConfigError(f"{where}: token_id {row} is out of range for {label(model)} "
                                  f"({alignment.sizes[model]} rows)")
        else:
            row = alignment.vocabs[model].get(source.token, -1)
            if not 0 <= row < alignment.sizes[model]:
                raise ConfigError(f"{where}: {label(model)} has no token {source.token!r}; check the token text")
        alignment.overrides[token_id] = TokenOverride(model, row, setting.force)
    if alignment.overrides:
        alignment.identity = False
