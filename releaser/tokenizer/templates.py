"""Chat templates: the built-ins in ``templates/chat/`` (with their end-of-turn token and stop strings) and user files.

Templates are model-supplied Jinja, so they are compiled and rendered only by ``compile_chat_template`` and
``render_chat_template``, which use transformers' own chat-template environment (the one ``apply_chat_template``
uses: ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks, loop controls and the ``{% generation %}`` tag).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import yaml

from ..errors import ConfigError
from ..resources import templates_dir



class TemplateError(ConfigError):
    """A chat template is unknown, unreadable or not valid Jinja."""


@dataclass(frozen=True)
class ChatTemplate:
    name: str                         # built-in name, or the file's stem
    source: str                       # the Jinja text
    eos: str | None = None            # token that ends an assistant turn; None: the template writes {{ eos_token }}
    tokens: tuple[str, ...] = ()      # control tokens the template writes literally
    stop: tuple[str, ...] = ()        # extra stop strings for runtimes
    description: str = ""
    path: Path | None = field(default=None, compare=False)
    ollama: str | None = None         # the Ollama template its detection picks for exactly this text (None: none)

    @property
    def go_template(self) -> str | None:
        """The same format as a Go template for Ollama (``NAME.gotmpl`` beside the Jinja file; ``@BOS@``/``@EOS@``
        stand for the tokenizer's bos and eos text), or None."""
        go = self.path.with_suffix(".gotmpl") if self.path else None
        return go.read_text(encoding="utf-8") if go and go.is_file() else None

    def stop_strings(self, eos_token: str | None) -> list[str]:
        """Every string a runtime should stop on: the end-of-turn token first, then the extra stop strings."""
        first = [self.eos or eos_token] if (self.eos or eos_token) else []
        return list(dict.fromkeys(first + list(self.stop)))


# What rendering a model-supplied template can raise (a syntax error, a sandbox refusal, raise_exception, bad data).
RENDER_ERRORS = (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in transformers' chat-template sandbox (cached by transformers); the one place
    releaser compiles a model-supplied template. Raises jinja2.TemplateSyntaxError."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(source)


def render_chat_template(source: str, messages: list[dict], add_generation_prompt: bool = False,
                         **variables) -> str:
    """Render ``messages`` with ``source`` exactly as transformers' ``apply_chat_template`` does (same sandbox, same
    message conversion); ``variables`` are the extra template variables (bos_token, eos_token, ...)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    compile_chat_template(source)
    rendered, _ = render_jinja_template([messages], chat_template=source,
                                        add_generation_prompt=add_generation_prompt, **variables)
    return rendered[0]


def check_syntax(source: str, where: str) -> None:
    """Raise TemplateError naming the line of a Jinja syntax error."""
    try:
        compile_chat_template(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{where} line {exc.lineno}: Jinja syntax error: {exc.message}; fix the template") from None


def check_renders(source: str, where: str, **variables) -> str:
    """Compile ``source`` and render a plain user/assistant conversation with it in the sandbox, as ``release``
    does before it writes a template; raise TemplateError naming a syntax error, a sandbox refusal or any other
    failure. Returns the rendered text."""
    from .stoptest import CONVERSATION

    check_syntax(source, where)
    try:
        return render_chat_template(source, CONVERSATION, **variables)
    except RENDER_ERRORS as exc:
        text = " ".join(str(exc).split())[:200]
        raise TemplateError(f"{where} fails on a plain user/assistant conversation ({type(exc).__name__}: {text}); "
                            "fix the template or choose another") from None


def _catalog() -> dict[str, dict]:
    meta = templates_dir() / "chat" / "templates.yaml"
    try:
        data = yaml.safe_load(meta.read_text())
    except (OSError, yaml.YAMLError) as exc:  # pragma: no cover - broken installation
        raise TemplateError(f"cannot read the built-in template list {meta} ({exc}); reinstall releaser") from exc
    return data


def builtin_names() -> list[str]:
    return list(_catalog())


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").removesuffix("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"cannot read chat template {path} ({exc}); check the path") from None


def load_template(name_or_path: str | Path) -> ChatTemplate:
    """A built-in by name (``chatml``, ``llama3``, ...) or a user ``.jinja`` file (checked for syntax errors).

    A user file may sit beside a ``NAME.yaml`` with the same ``eos``/``tokens``/``stop`` keys as ``templates.yaml``.
    """
    catalog = _catalog()
    text = str(name_or_path)
    if text in catalog:
        meta = catalog[text]
        path = templates_dir() / "chat" / f"{text}.jinja"
        return ChatTemplate(text, _read(path), meta.get("eos"), tuple(meta.get("tokens") or ()),
                            tuple(meta.get("stop") or ()), meta.get("description", ""), path, meta.get("ollama"))
    path = Path(name_or_path)
    if path.is_dir():
        raise TemplateError(f"chat template {path} is a folder; give a .jinja file or a built-in name")
    if not path.is_file():
        if path.suffix or len(path.parts) > 1:
            raise TemplateError(f"chat template file {path} does not exist; check the path")
        raise TemplateError(f"unknown chat template {text!r}; use one of {', '.join(catalog)} "
                            "or the path of a .jinja file")
    source = _read(path)
    check_syntax(source, str(path))
    meta = {}
    side = path.with_suffix(".yaml")
    if side.is_file():
        try:
            meta = yaml.safe_load(side.read_text()) or {}
        except yaml.YAMLError as exc:
            raise TemplateError(f"{side} is not valid YAML ({exc})") from None
    return ChatTemplate(path.stem, source, meta.get("eos"), tuple(meta.get("tokens") or ()),
                        tuple(meta.get("stop") or ()), meta.get("description", ""), path)


def with_default_system(source: str, system_prompt: str) -> str:
    """Prefix ``source`` so that a conversation without a system message gets ``system_prompt``."""
    literal = json.dumps(system_prompt, ensure_ascii=True)
    return ("{%- if not messages or messages[0]['role'] != 'system' %}"
            "{%- set messages = [{'role': 'system', 'content': " + literal + "}] + messages %}"
            "{%- endif %}" + source)
