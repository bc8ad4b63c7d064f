"""Template conformance: does llama.cpp's built-in chat formatter render a conversation as the model's own (Jinja)
chat template does?

llama.cpp has two paths. Its Jinja engine (llama-server's default since 2025-11, ``--jinja``; ``llama-cli`` and the
C API's ``llama_chat_apply_template`` do not use it) runs the GGUF's template; its built-in formatter guesses a known
format from substrings of the template (``llm_chat_detect_template``) and writes that format itself. Where the guess
renders differently, or finds no known format, clients on the built-in path (``--no-jinja``, older servers,
``llama_chat_apply_template`` in bindings) prompt the model wrongly, and the card says to pass ``--jinja``.

The check renders the same multi-turn conversation (system, user, assistant, user), with and without the generation
prompt, through transformers' chat-template sandbox and through ``llama_chat_apply_template`` of llama-cpp-python
(optional: without it the check reports "unchecked").
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from ..tokenizer.templates import RENDER_ERRORS, render_chat_template

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]
SAME, DIFFERS, UNKNOWN, UNCHECKED = "same", "differs", "unknown", "unchecked"


@dataclass(frozen=True)
class Conformance:
    status: str              # same | differs (the built-in formatter renders otherwise) | unknown (it knows no such
    #                          format) | unchecked (llama-cpp-python is not installed, or the template fails)
    detail: str              # one line: what differs, or why it was not checked
    jinja: str | None = None     # the transformers rendering with the generation prompt
    builtin: str | None = None   # llama.cpp's built-in rendering with the generation prompt

    @property
    def needs_jinja(self) -> bool:
        return self.status in (DIFFERS, UNKNOWN)


def llama_cpp_render(template: str, messages: list[dict], add_generation_prompt: bool) -> str | None:
    """``llama_chat_apply_template`` (llama.cpp's built-in formatter); None when it knows no format for ``template``.
    Raises ImportError without llama-cpp-python."""
    import llama_cpp

    n = len(messages)
    keep = [(m["role"].encode(), m["content"].encode()) for m in messages]   # alive while llama.cpp reads them
    chat = (llama_cpp.llama_chat_message * n)(*(llama_cpp.llama_chat_message(role=r, content=c) for r, c in keep))
    size = 4096 + 2 * sum(len(c) for _, c in keep)
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        got = llama_cpp.llama_chat_apply_template(template.encode(), chat, n, add_generation_prompt, buf, size)
        if got < 0:
            return None
        if got <= size:
            return buf.raw[:got].decode("utf-8", errors="replace")
        size = got + 1
    return None


def _first_difference(a: str, b: str) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"from character {i}: {a[i:i + 30]!r} (Jinja) vs {b[i:i + 30]!r} (built-in)"


def _jinja(template: str, messages: list[dict], prompt: bool, bos: str, eos: str) -> str:
    """The transformers rendering without a leading ``{{ bos_token }}`` (found with a sentinel: a template may start
    with the bos token's text as a literal turn marker, as SmolLM2's ChatML does with <|im_start|>)."""
    mark = "\x02BOS\x02"
    text = render_chat_template(template, messages, add_generation_prompt=prompt, bos_token=mark, eos_token=eos)
    return text.removeprefix(mark).replace(mark, bos)


def check_template(template: str, bos: str = "", eos: str = "") -> Conformance:
    """Compare the two renderings of :data:`CONVERSATION` (without its system turn when the template refuses one; a
    BOS the Jinja template writes first is left out: llama.cpp adds it when it tokenizes, its built-in formatter does
    not write it)."""
    out = {}
    messages = CONVERSATION
    for prompt in (False, True):
        try:
            jinja = _jinja(template, messages, prompt, bos, eos)
        except RENDER_ERRORS:
            try:   # a template without a system role (Gemma, Mistral v0.1)
                messages = CONVERSATION[1:]
                jinja = _jinja(template, messages, prompt, bos, eos)
            except RENDER_ERRORS as exc:
                return Conformance(UNCHECKED, f"the chat template fails on a user/assistant/user conversation "
                                              f"({type(exc).__name__})")
        try:
            builtin = llama_cpp_render(template, messages, prompt)
        except ImportError:
            return Conformance(UNCHECKED, "llama-cpp-python is not installed (pip install releaser[llamacpp])", jinja)
        if builtin is None:
            return Conformance(UNKNOWN, "llama.cpp's built-in chat formatter does not recognise this template",
                               jinja)
        out[prompt] = (jinja, builtin)
    jinja, builtin = out[True]
    for prompt, (a, b) in out.items():
        if a != b:
            where = "with" if prompt else "without"
            return Conformance(DIFFERS, f"llama.cpp's built-in formatter renders the conversation differently "
                                        f"({where} the generation prompt, {_first_difference(a, b)})", jinja, builtin)
    return Conformance(SAME, "llama.cpp's built-in formatter renders the conversation as the chat template does",
                       jinja, builtin)
