"""The stop audit: which tokens does the model itself end its chat answers with, and does every artefact stop there?

The doctor and the stop test check what the files say. A fine-tune can end its turns with another token than its
template's (``<|endoftext|>`` where ChatML says ``<|im_end|>``), and a merge can lose the habit of ending at all.
:func:`stop_audit` samples one answer to each of N chat prompts (``data/stop_prompts.txt`` by default) from the
unquantized model, rendered through its chat template, all prompts in one batch (seeded; llama.cpp's default sampler
chain, top-k 40, top-p 0.95 and min-p 0.05, at the audit's temperature, 0.7 by default), and records the token that
ends each: the first special token of the tokenizer (an added token marked special, or a token llama.cpp treats as
end of generation) the answer emits, or none within ``max_tokens``.

Every ending token must be a declared stop (:func:`releaser.gguf.stops.declared_stop_ids`: generation_config.json's
``eos_token_id`` list, config.json's, the tokenizer's eos), else the fix is ``tokenizer: {eos: [END_OF_TURN,
TOKEN]}``; and most answers must end (``min_ended``, half by default): a model that rarely stops is not a release.
The release's gate checks the same ending tokens against every artefact and runtime file.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import ModelError
from .options import StopAuditOptions

# llama.cpp's default sampler settings (common/common.h), the audit's temperature aside
TOP_K, TOP_P, MIN_P = 40, 0.95, 0.05


def builtin_prompts() -> list[str]:
    text = resources.files("releaser.tokenizer").joinpath("data/stop_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_prompts(source: str) -> list[str]:
    """The prompts: ``builtin`` or a UTF-8 text file with one prompt a line."""
    if source == "builtin":
        return builtin_prompts()
    try:
        lines = Path(source).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read the stop audit's prompts {source} ({exc}); give a UTF-8 text file with one "
                         "prompt a line, or builtin") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ModelError(f"the stop audit's prompts file {source} has no prompt; write one prompt a line")
    return prompts


@dataclass
class AuditResult:
    answers: int
    endings: list[int | None]                       # per answer: the id of the token that ended it (None: never)
    tokens: dict[int, str]                          # id -> text of every ending token
    declared: list[int]                             # the folder's declared stop ids
    end_of_turn: str | None                         # the tokenizer's eos (the template's end of turn)
    max_tokens: int
    min_ended: float
    seconds: float = 0.0
    lengths: list[int] = field(default_factory=list)

    @property
    def ended(self) -> int:
        return sum(e is not None for e in self.endings)

    @property
    def share_ended(self) -> float:
        return self.ended / self.answers if self.answers else 0.0

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.endings:
            if e is not None:
                out[self.tokens[e]] = out.get(self.tokens[e], 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    @property
    def undeclared(self) -> list[int]:
        return [i for i in dict.fromkeys(e for e in self.endings if e is not None) if i not in self.declared]

    def fix(self, missing: list[str]) -> str:
        eot = [self.end_of_turn] if self.end_of_turn and self.end_of_turn not in missing else []
        return "tokenizer: {eos: [" + ", ".join(eot + missing) + "]}"

    def problems(self, where: str = "") -> list[str]:
        """What fails: undeclared ending tokens (each named, with the fix) and too few answers ending."""
        where = where or "the model folder"
        out = []
        if missing := self.undeclared:
            names = [self.tokens[i] for i in missing]
            n = sum(e in missing for e in self.endings)
            out.append(f"{n} of {self.answers} sampled answers end with "
                       f"{', '.join(f'{t!r} (id {i})' for t, i in zip(names, missing))}, which {where} does not "
                       f"declare a stop, so runtimes would run past it; declare it in the recipe: {self.fix(names)}")
        if self.share_ended < self.min_ended:
            out.append(f"only {self.ended} of {self.answers} sampled answers ({self.share_ended:.0%}) end within "
                       f"{self.max_tokens} tokens (at least {self.min_ended:.0%} must): the model does not stop; "
                       "fix the merge or the training so that it ends its turns (or lower stop_audit.min_ended)")
        return out

    def to_dict(self) -> dict:
        return {"answers": self.answers, "ended": self.ended, "share_ended": round(self.share_ended, 4),
                "endings": {self.tokens[i]: i for i in dict.fromkeys(e for e in self.endings if e is not None)},
                "counts": self.counts, "declared": self.declared, "end_of_turn": self.end_of_turn,
                "max_tokens": self.max_tokens, "min_ended": self.min_ended, "lengths": self.lengths,
                "seconds": round(self.seconds, 1)}


def ending_ids(tokenizer) -> set[int]:
    """The tokens that end an answer: the tokenizer's special added tokens and those llama.cpp ends generation on."""
    from ..gguf.stops import LLAMA_EOG_TEXTS

    ids = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in LLAMA_EOG_TEXTS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def stop_audit(folder: str | Path, options: StopAuditOptions | None = None, *, model=None,
               tokenizer=None) -> AuditResult:
    """Sample answers from the model folder ``folder`` (``model``/``tokenizer``: already loaded) as ``options`` say
    and record how each ends (see the module docstring)."""
    import torch

    from ..gguf.stops import declared_stop_ids
    from .model import load_tokenizer

    options = options or StopAuditOptions()
    folder = Path(folder)
    start = time.monotonic()
    tok = tokenizer or load_tokenizer(folder, "the stop audit")
    if not getattr(tok, "chat_template", None):
        raise ModelError(f"{folder} has no chat template, so the stop audit cannot ask it anything; set "
                         "tokenizer: {template: ...} in the recipe")
    given = load_prompts(options.prompts)
    prompts = [given[i % len(given)] for i in range(options.samples)]   # more samples than prompts: asked again
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    stops = ending_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(stops)
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])             # left-padded: one batch
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    if model is None:
        from ..quality.load import load

        model = load(Path(folder))   # the one reader of model folders: float32, tied embeddings, families checked
    answers = sample(model, ids, mask, stops, options)
    endings, lengths = [], []
    for row in answers:
        endings.append(row[-1] if row and row[-1] in stops else None)
        lengths.append(len(row))
    tokens = {i: tok.convert_ids_to_tokens(i) for i in set(endings) if i is not None}
    return AuditResult(len(prompts), endings, tokens, declared_stop_ids(folder, tok.eos_token_id), tok.eos_token,
                       options.max_tokens, options.min_ended, time.monotonic() - start, lengths)


def _pick(logits, generator, temperature: float):
    """One token per row: llama.cpp's default chain (top-k, top-p, min-p) at ``temperature``, then a seeded draw."""
    import torch

    values, index = torch.topk(logits.float() / temperature, min(TOP_K, logits.shape[-1]), dim=-1)   # sorted
    probs = torch.softmax(values, dim=-1)
    before = probs.cumsum(-1) - probs
    probs = probs.masked_fill(before >= TOP_P, 0)                      # the smallest prefix reaching top-p
    probs = probs.masked_fill(probs < MIN_P * probs[:, :1], 0)          # and at least min-p of the most likely
    choice = torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator)
    return index.gather(-1, choice)[:, 0]


@contextmanager
def _one_thread():
    """Torch on one thread meanwhile: one-token steps of a small batch gain little from more, and on this project's
    2 busy cores 2 threads made each step 8 times slower (0.15 s against 1.2 s for SmolLM2-135M, 16 rows)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sample(model, ids, mask, stops: set[int], options: StopAuditOptions) -> list[list[int]]:
    """Sampled continuations of the left-padded batch ``ids``: each row until a token of ``stops`` (kept as its last
    token) or ``options.max_tokens``. Rows that ended leave the batch (and the KV cache), so the cost follows the
    answers' total length."""
    import inspect

    import torch
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(options.seed)
    cache = DynamicCache()
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    alive = list(range(ids.shape[0]))
    answers: list[list[int]] = [[] for _ in alive]
    with _one_thread(), torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       logits_to_keep=1, **{key: cache}).logits[:, -1]
        position = positions[:, -1:] + 1
        for step in range(options.max_tokens):
            chosen = _pick(logits, generator, options.temperature)
            keep = []
            for j, row in enumerate(alive):
                answers[row].append(int(chosen[j]))
                if answers[row][-1] not in stops:
                    keep.append(j)
            if not keep or step == options.max_tokens - 1:
                break
            if len(keep) < len(alive):
                index = torch.tensor(keep)
                cache.batch_select_indices(index)
                mask, position, chosen = mask[index], position[index], chosen[index]
                alive = [alive[j] for j in keep]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=position, use_cache=True,
                           logits_to_keep=1, **{key: cache}).logits[:, -1]
            position = position + 1
    return answers
