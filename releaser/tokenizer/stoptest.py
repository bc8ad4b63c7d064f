"""The stop test: does a model's chat template end assistant turns with a token that makes generation stop?

Renders a two-turn conversation with transformers' sandboxed ``apply_chat_template``, tokenizes it the way a raw-prompt
runtime does (``add_special_tokens=True``), and checks that the token closing each assistant turn is the tokenizer's
eos and is in generation_config's eos list, that ``add_generation_prompt=True`` ends with the assistant header, and
that the prompt does not start with two BOS tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .findings import Finding
from .templates import RENDER_ERRORS

CONVERSATION = [
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Two plus two is four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Three plus three is six."},
]


class RenderError(Exception):
    pass


def render(tokenizer, source: str, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except RENDER_ERRORS as exc:
        raise RenderError(f"{type(exc).__name__}: {exc}") from exc


@dataclass
class StopResult:
    terminators: list[int] = field(default_factory=list)   # token id closing each assistant turn (None: not closed)
    findings: list[Finding] = field(default_factory=list)
    text: str = ""

    @property
    def passed(self) -> bool:
        return not self.findings


def _turn_ends(tokenizer, text: str) -> list[int | None]:
    """The first non-blank token after each assistant message's content."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    ends, pos = [], 0
    for msg in CONVERSATION:
        if msg["role"] != "assistant":
            continue
        at = text.find(msg["content"], pos)
        if at < 0:
            ends.append(None)
            continue
        pos = at + len(msg["content"])
        after = [i for i, (s, e) in enumerate(offsets) if s >= pos and text[s:e].strip()]
        ends.append(ids[after[0]] if after else None)
    return ends


def stop_test(tokenizer, source: str, eos_ids: list[int]) -> StopResult:
    """Run the stop test for template ``source`` with ``tokenizer`` and the generation eos list ``eos_ids``."""
    result = StopResult()
    add = result.findings.append
    try:
        text = result.text = render(tokenizer, source, CONVERSATION)
        prompt = render(tokenizer, source, CONVERSATION[:1], add_generation_prompt=True)
        first = render(tokenizer, source, CONVERSATION[:2])
    except RenderError as exc:
        add(Finding("template-render", "the chat template fails on a plain user/assistant conversation",
                    str(exc)[:200], "choose a template that renders"))
        return result
    answer = CONVERSATION[1]["content"]
    if not (first.startswith(prompt) and first[len(prompt):].lstrip().startswith(answer)):
        add(Finding("no-generation-prompt", "add_generation_prompt=True does not end with the assistant header",
                    f"prompt ends with {prompt[-40:]!r}", "use a template with an add_generation_prompt block"))
    eos = tokenizer.eos_token_id
    result.terminators = _turn_ends(tokenizer, text)
    for tid in dict.fromkeys(result.terminators):
        if tid is None:
            add(Finding("turn-not-closed", "an assistant turn is not followed by any token",
                        f"rendered text ends with {text[-40:]!r}", "use a template that closes assistant turns"))
            continue
        name = tokenizer.convert_ids_to_tokens(tid)
        added = tokenizer.added_tokens_decoder.get(tid)
        if added is None or not added.special:
            add(Finding("terminator-not-special", f"assistant turns end with {name!r}, which is not a special token",
                        f"token id {tid}", "mark it special and not normalized"))
        if tid != eos:
            add(Finding("eos-mismatch", f"assistant turns end with {name!r} but the tokenizer's eos is "
                        f"{tokenizer.eos_token!r}", f"end-of-turn id {tid}, eos id {eos}",
                        f"make {name!r} the eos"))
        if tid not in eos_ids:
            add(Finding("generation-eos", f"generation_config.json does not list the end-of-turn token {name!r}",
                        f"eos_token_id {eos_ids or 'missing'}, end-of-turn id {tid}",
                        f"add {tid} to eos_token_id"))
    bos = tokenizer.bos_token_id
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if bos is not None and ids[:2] == [bos, bos]:
        add(Finding("double-bos", "the prompt starts with two BOS tokens (the template and the tokenizer both add one)",
                    f"first ids {ids[:4]}", "stop the tokenizer adding BOS (the template writes it)"))
    return result
