"""Render model cards from checked facts with strict Jinja2 templates, and validate the result."""

from __future__ import annotations

import os
import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from ..atomic import write_file
from ..checkpoint.config import read_config
from ..checkpoint.reader import check_folder
from ..errors import ModelError, OutputError, ReleaserError
from ..recipe import Recipe
from ..resources import templates_dir
from .context import Facts, card_context, human_count, human_size
from .facts import model_facts
from .quality import quality_facts
from .quant_facts import awq_facts, gguf_facts, mlx_facts, w4a16_facts

TEMPLATE_FOR = {"model": "model.md.j2", "gguf": "gguf.md.j2", "awq": "awq.md.j2", "w4a16": "w4a16.md.j2",
                "mlx": "mlx.md.j2"}


class CardError(ReleaserError):
    """A card cannot be rendered: a template error or a rendered card that breaks the card rules."""


@dataclass(frozen=True)
class CardResult:
    path: Path
    kind: str        # model | gguf | awq | w4a16 | mlx
    template: Path
    bytes: int


def gather_facts(model_dir: str | os.PathLike) -> Facts:
    """Read what a card states from a model folder: HF (merged or not), GGUF, AWQ, W4A16 or MLX."""
    folder = Path(model_dir)
    check_folder(folder)
    if any(folder.glob("*.gguf")):
        return gguf_facts(folder)
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} has neither config.json nor .gguf files; is it a model folder?")
    from ..quality.load import folder_kind

    kind = folder_kind(read_config(folder))
    read = {"awq": awq_facts, "w4a16": w4a16_facts, "mlx": mlx_facts}.get(kind[0] if kind else "")
    return read(folder) if read else model_facts(folder)


def _environment(search: list[Path]) -> jinja2.Environment:
    env = SandboxedEnvironment(loader=jinja2.FileSystemLoader([str(p) for p in search]),
                               undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True,
                               trim_blocks=True, lstrip_blocks=True)
    env.filters.update(size=human_size, count=human_count, hub=lambda repo: f"https://huggingface.co/{repo}",
                       kld=lambda x: f"{x:.4f}" if x >= 0.001 else f"{x:.1e}")
    return env


def _template_frame(exc: BaseException, search: list[Path]) -> str | None:
    """``file:line`` of the innermost template frame of a rendering error (Jinja maps frames to template lines)."""
    roots = [str(p.resolve()) + os.sep for p in search]
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if any(f.filename.startswith(r) for r in roots)]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else None


def _syntax_error(exc: jinja2.TemplateSyntaxError, path: Path) -> str:
    return f"{exc.filename or path}:{exc.lineno}: template syntax error: {exc.message}; fix the template"


def check_template(template: str | os.PathLike, what: str = "card template") -> jinja2.Template:
    """A card template, compiled (its Jinja syntax checked) before any model is read."""
    path = Path(template)
    if not path.is_file():
        raise CardError(f"{what}: {path} does not exist")
    try:
        return _environment([path.resolve().parent, templates_dir() / "cards"]).get_template(path.name)
    except jinja2.TemplateSyntaxError as exc:
        raise CardError(_syntax_error(exc, path)) from None


def render_card(model_dir: str | os.PathLike, recipe: Recipe | None = None,
                template: str | os.PathLike | None = None, quality: dict | str | os.PathLike | None = None) -> str:
    """The card (README.md text) for ``model_dir``, from the built-in template for its kind or ``template``;
    ``quality`` (a quality report or its JSON path) adds the measured figures to GGUF and AWQ cards."""
    return _render(model_dir, recipe, template, quality)[0]


def _render(model_dir, recipe, template, quality=None) -> tuple[str, Facts, Path]:
    facts = gather_facts(model_dir)
    measured = quality_facts(quality) if quality is not None else None
    path = Path(template) if template else templates_dir() / "cards" / TEMPLATE_FOR[facts.kind]
    search = [path.resolve().parent, templates_dir() / "cards"]
    compiled = check_template(path)
    try:
        text = compiled.render(card_context(facts, recipe, measured))
    except jinja2.TemplateSyntaxError as exc:   # in a template it includes
        raise CardError(_syntax_error(exc, path)) from None
    except jinja2.UndefinedError as exc:
        where = _template_frame(exc, search) or str(path)
        raise CardError(f"{where}: undefined variable: {exc.message}; see templates/cards/README.md for the "
                        "variables a card template can use") from None
    except jinja2.TemplateError as exc:
        raise CardError(f"{path}: template error: {exc}") from None
    text = tidy_markdown(text)
    check_card(text, path)
    return text, facts, path


_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_NONE = re.compile(r"(^|[:|=(\[,*]\s*)None\s*($|[|,)\].*])")  # a Python None where a value belongs


def _outside_code(text: str) -> list[str]:
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            lines.append("```")  # keeps code blocks as section content without their text
        elif not fenced:
            lines.append(line)
    return lines


def tidy_markdown(text: str) -> str:
    """Collapse runs of blank lines outside code blocks (templates stay readable) and end with one newline."""
    out: list[str] = []
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and not line.strip() and (not out or not out[-1].strip()):
            continue
        out.append(line)
    return "\n".join(out).rstrip("\n") + "\n"


def check_card(text: str, template: Path) -> None:
    """Refuse placeholders, stray None values, empty sections and front matter the Hub would not accept."""
    from huggingface_hub import ModelCard

    if "More Information Needed" in text:
        raise CardError(f"{template}: the card contains '[More Information Needed]'")
    try:
        card = ModelCard(text, ignore_metadata_errors=False)
    except (ValueError, TypeError) as exc:
        raise CardError(f"{template}: the front matter is not valid Hub metadata: {exc}") from None
    if not card.data.to_dict():
        raise CardError(f"{template}: the card has no YAML front matter")
    body = _outside_code(card.text)
    for line in body:
        if _NONE.search(line):
            raise CardError(f"{template}: the card contains 'None' (a missing fact): {line.strip()!r}")
    for i, line in enumerate(body):
        m = _HEADING.match(line)
        if not m:
            continue
        level, content = len(m[1]), False
        for nxt in body[i + 1:]:
            h = _HEADING.match(nxt)
            if h and len(h[1]) <= level:
                break
            if nxt.strip() and not h:
                content = True
                break
        if not content:
            raise CardError(f"{template}: section {m[2]!r} is empty")


def check_card_output(out: Path, model_dir: Path, overwrite: bool, inputs: tuple = ()) -> None:
    """Refuse a folder, an existing file without ``overwrite``, and any input: a file of the model (its README.md
    aside, which is where a card goes), the template, the recipe."""
    if out.is_dir():
        raise OutputError(f"{out} is a folder; give the card's file path, e.g. {out / 'README.md'}")
    if not out.exists():
        return
    target = out.resolve()
    model_files = {p.resolve() for p in Path(model_dir).rglob("*") if p.is_file() and p.name != "README.md"}
    if target in model_files or target in {Path(p).resolve() for p in inputs if p}:
        raise OutputError(f"{out} is an input of the card; choose another output file")
    if not overwrite:
        raise OutputError(f"{out} already exists; pass --overwrite to replace it or choose another output file")


def write_card(model_dir: str | os.PathLike, out: str | os.PathLike, recipe: Recipe | None = None,
               template: str | os.PathLike | None = None, *, overwrite: bool = False,
               inputs: tuple = (), quality: dict | str | os.PathLike | None = None) -> CardResult:
    """Render the card and write it to ``out`` atomically (temporary name, then rename). An existing ``out`` is
    replaced only with ``overwrite``, an input (``inputs``: e.g. the recipe file) never; ``quality`` adds measured
    figures (see :func:`render_card`)."""
    out = Path(out)
    check_card_output(out, Path(model_dir), overwrite, (template, *inputs))
    text, facts, path = _render(model_dir, recipe, template, quality)
    out = write_file(out, text, overwrite=overwrite)
    return CardResult(out, facts.kind, path, len(text.encode()))
