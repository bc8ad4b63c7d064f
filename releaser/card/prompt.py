"""Prompt-format facts: a chat template rendered on a sample conversation, stop tokens, an Ollama TEMPLATE.

Hugging Face folders are rendered with transformers' ``apply_chat_template``; GGUF chat templates with
``render_chat_template``, the same transformers chat-template sandbox without a tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable

from ..errors import ModelError
from ..tokenizer.templates import RENDER_ERRORS, compile_chat_template, render_chat_template

SYSTEM, PROMPT = "{system_prompt}", "{prompt}"
Render = Callable[[list[dict]], str]     # messages -> prompt text (with the generation prompt)


@dataclass(frozen=True)
class PromptFacts:
    sample: str | None          # the template applied to a sample conversation; None when there is no chat template
    stop_tokens: list[str]      # strings that end a turn (eos and end-of-turn tokens)
    ollama_template: str | None  # the same format as an Ollama Modelfile TEMPLATE (Go template syntax)


def _messages(system: str | None, user: str) -> list[dict]:
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [{"role": "user", "content": user}]


def _try(render: Render, messages: list[dict]) -> str | None:
    try:
        return render(messages)
    except Exception:  # noqa: BLE001 - a template may refuse a system turn (raise_exception) or fail on it
        return None


def sample_prompt(render: Render) -> str:
    """The prompt for a system + user turn (or a user turn alone when the template rejects system messages)."""
    with_system = _try(render, _messages(SYSTEM, PROMPT))
    return with_system if with_system is not None else render(_messages(None, PROMPT))


def ollama_template(render: Render, stop: str, bos: str | None) -> str:
    """Translate a chat template into Ollama's Go-template form by rendering it with sentinel contents."""
    s_mark, p_mark = "\x01SYSTEM\x01", "\x01PROMPT\x01"

    def go(text: str) -> str:
        if bos and text.startswith(bos):
            text = text[len(bos):]  # llama.cpp and Ollama add the BOS token themselves
        return text.replace(s_mark, "{{ .System }}").replace(p_mark, "{{ .Prompt }}")

    plain = go(render(_messages(None, p_mark)))
    with_system = _try(render, _messages(s_mark, p_mark))
    if with_system is None or s_mark not in with_system:
        body = plain
    else:
        system = go(with_system)
        n = _common_suffix(system, plain)
        other = "{{ else }}" + plain[: len(plain) - n] if n < len(plain) else ""
        body = "{{ if .System }}" + system[: len(system) - n] + other + "{{ end }}" + plain[len(plain) - n:]
    return body + "{{ .Response }}" + stop


def _common_suffix(a: str, b: str) -> int:
    """Length of the longest common suffix of two Go templates that does not start inside a ``{{ ... }}`` action."""
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    tail = b[len(b) - n:]
    close, open_ = tail.find("}}"), tail.find("{{")
    if close != -1 and (open_ == -1 or close < open_):
        n -= close + 2
    return n


def jinja_renderer(template: str, bos: str, eos: str) -> Render:
    """Render a model-supplied chat template in transformers' chat-template sandbox, with the variables transformers
    passes; a syntax error raises here, not on the first render."""
    compile_chat_template(template)

    def render(messages: list[dict]) -> str:
        return render_chat_template(template, messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)

    return render


@contextmanager
def template_errors(where: str, fix: str) -> Iterator[None]:
    """Turn a chat template that cannot be compiled or rendered (syntax, sandbox refusal) into one ModelError."""
    try:
        yield
    except RENDER_ERRORS as exc:
        text = " ".join(str(exc).split())[:200]
        raise ModelError(f"the chat template of {where} cannot be rendered ({type(exc).__name__}: {text}); {fix}") \
            from None


def prompt_facts(render: Render | None, stop_tokens: list[str], bos: str | None) -> PromptFacts:
    stops = list(dict.fromkeys(t for t in stop_tokens if t))
    if render is None:
        return PromptFacts(None, stops, None)
    return PromptFacts(sample_prompt(render), stops, ollama_template(render, stops[0] if stops else "", bos))
