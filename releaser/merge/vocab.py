"""Vocabulary alignment for ``tokenizer_source: base | union | <model>`` (mergekit 0.1.5 semantics).

The output tokenizer is built first; each model's embedding and lm_head rows are then permuted into the output's token
order. A model that lacks a token gets, for that row: the only owner's row when one model has the token, a zero row
when none has it, the base model's row when the base has it, otherwise the mean of the owners' rows. The merge method
then merges these aligned matrices like any other tensor.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, ModelError


@dataclass
class VocabAlignment:
    tokenizer: object                       # transformers tokenizer of the output
    size: int                               # rows of the output embedding
    perms: dict[int, torch.Tensor]          # model index -> [size] original row id, or -1 when missing
    identity: bool                          # every model already has the output's rows in order
    folder: str | None                      # copy the tokenizer files from here (None: save ``tokenizer``)

    def align(self, tensors: list[torch.Tensor], models: list[int], base_pos: int | None) -> list[torch.Tensor]:
        if self.identity:
            return tensors
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        perms = [self.perms[m] for m in models]
        has = torch.stack([p >= 0 for p in perms])                        # [models, size]
        rows = [t.to(dtype)[p.clamp(min=0)] for t, p in zip(tensors, perms)]
        need = ~has.all(0)
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
        return [torch.where(h.unsqueeze(1), r, default) for r, h in zip(rows, has)]


def _load_tokenizer(folder: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:  # transformers raises many kinds for a missing or broken tokenizer
        raise ModelError(f"cannot load the tokenizer of {folder} ({type(exc).__name__}); "
                         "tokenizer_source needs every model's tokenizer files") from exc


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
    from transformers import AutoTokenizer

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
        out = AutoTokenizer.from_pretrained(tmp, trust_remote_code=False)
    base_vocab = base_tok.get_vocab()
    for name in vocab:
        if name not in added and name not in base_vocab:
            out.add_tokens(name)
    for info in added.values():
        out.add_tokens(info)
    return out


def build_alignment(source: str, models: list[str], configs: list[dict], base: int) -> VocabAlignment:
    """Build the output tokenizer for ``tokenizer_source`` and each model's row permutation."""
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
    return VocabAlignment(out, size, perms, identity, folder)
