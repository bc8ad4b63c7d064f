"""``releaser doctor``: find the reasons a model will not stop generating (or stops badly), without changing anything.

Reads config.json, generation_config.json, the tokenizer files, the chat template and (lazily) the embedding rows of the
tokens the template writes. Problems that break generation are errors; ``pad == eos`` and a missing pad token only
matter for training and batching, so they are warnings and do not make the doctor fail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import CheckpointReader
from .findings import ERROR, WARNING, Finding, has_errors
from .model import ModelFolder, embedding_names, eos_list, untrained_rows
from .stoptest import CONVERSATION, RenderError, render, stop_test
from .templates import ChatTemplate, load_template


@dataclass
class DoctorReport:
    model_dir: Path
    template: str | None                 # built-in or file checked against (None: the model's own template only)
    eos_token: str | None
    end_of_turn: list[str] = field(default_factory=list)
    generation_eos: list[int] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    llama_cpp: str | None = None         # template conformance with llama.cpp's built-in formatter (``runtimes``)

    @property
    def clean(self) -> bool:
        return not has_errors(self.findings)

    def to_dict(self) -> dict:
        return {"model_dir": str(self.model_dir), "template": self.template, "clean": self.clean,
                "eos_token": self.eos_token, "end_of_turn": self.end_of_turn, "generation_eos": self.generation_eos,
                "llama_cpp": self.llama_cpp, "findings": [f.to_dict() for f in self.findings]}


def model_template(tokenizer) -> str | None:
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):
        tpl = tpl.get("default") or next(iter(tpl.values()), None)
    return tpl or None


def _token_findings(model: ModelFolder, tokens: list[str]) -> list[Finding]:
    out = []
    for tok in tokens:
        tid = model.token_id(tok)
        if tid is None:
            out.append(Finding("token-missing", f"the template writes {tok!r}, which is not a token of the vocabulary",
                               "it would be split into several ordinary tokens",
                               "add it as a special token"))
            continue
        added = model.tokenizer.added_tokens_decoder.get(tid)
        if added is None or not added.special or added.normalized:
            state = "not an added token" if added is None else f"special={added.special}, normalized={added.normalized}"
            out.append(Finding("token-not-special", f"template token {tok!r} is not marked special", state,
                               "mark it special and not normalized"))
    return out


def _weight_findings(model: ModelFolder, ids: list[int], tensors: dict | None = None) -> list[Finding]:
    """Embedding checks; ``tensors`` (name -> tensor) replace the checkpoint's tensors of the same names."""
    out = []
    tensors = tensors or {}
    with CheckpointReader(model.path) as reader:
        embed, head = embedding_names(reader)
        shape = tuple(tensors[embed].shape) if embed in tensors else tuple(reader.tensors[embed].shape)
        rows = shape[0]
        if len(model.tokenizer) > rows:
            out.append(Finding("vocab-mismatch", f"the tokenizer has {len(model.tokenizer)} tokens but the embedding "
                               f"has {rows} rows", f"{embed} {shape}",
                               "resize the embeddings"))
        bad = set()
        for name in (embed, head):
            if name:
                matrix = tensors[name] if name in tensors else reader.read(name)
                bad.update(untrained_rows(matrix, ids))
    if bad:
        names = ", ".join(f"{model.tokenizer.convert_ids_to_tokens(i)!r} ({i})" for i in sorted(bad))
        out.append(Finding("untrained-rows", "embedding rows of tokens the template writes are untrained (zero)",
                           names, "set them to the mean of the trained rows"))
    return out


def _emitted_ids(model: ModelFolder, text: str) -> list[int]:
    """Ids of the added (control) tokens that appear in a rendered conversation."""
    ids = model.tokenizer(text, add_special_tokens=True)["input_ids"]
    return sorted({i for i in ids if i in model.tokenizer.added_tokens_decoder})


def _llama_cpp_finding(tok, source: str) -> tuple[str, Finding | None]:
    """How llama.cpp's built-in chat formatter renders the template (releaser.runtimes.conformance); a warning when
    it renders otherwise or knows no such format (the card then tells llama.cpp users to pass --jinja)."""
    from ..runtimes.conformance import check_template

    result = check_template(source, tok.bos_token or "", tok.eos_token or "")
    if not result.needs_jinja:
        return result.status, None
    return result.status, Finding("llamacpp-template", "llama.cpp's built-in chat formatter (llama-cli, --no-jinja, "
                                  "llama_chat_apply_template) does not render this template as transformers does",
                                  result.detail, "run llama.cpp with --jinja (llama-server's default) so it uses the "
                                  "model's own template; the GGUF card says so", WARNING)


def diagnose(model_dir: str | Path | ModelFolder, template: str | Path | ChatTemplate | None = None, *,
             tensors: dict | None = None, runtimes: bool = False) -> DoctorReport:
    """Check a model folder; ``template`` (a built-in name, a .jinja path) is the chat format it should have.
    ``runtimes``: also compare the chat template with llama.cpp's built-in formatter (needs llama-cpp-python;
    ``report.llama_cpp`` is the result).

    ``model_dir`` may be an opened :class:`ModelFolder` (a planned result held in memory) and ``tensors`` embedding
    tensors that replace the checkpoint's (a planned resize), so a fix can be checked before it is written."""
    model = model_dir if isinstance(model_dir, ModelFolder) else ModelFolder.open(model_dir)
    tok = model.tokenizer
    spec = load_template(template) if isinstance(template, (str, Path)) else template
    report = DoctorReport(model.path, spec.name if spec else None, tok.eos_token,
                          generation_eos=model.generation_eos)
    add = report.findings.append
    if spec:
        try:
            render(tok, spec.source, CONVERSATION)
        except RenderError as exc:
            add(Finding("template-render", f"the template {spec.name} fails on a plain user/assistant conversation",
                        str(exc)[:200], "fix the template or choose another"))
    own = model_template(tok)
    if own is None:
        add(Finding("no-template", "the model has no chat template", "no chat_template.jinja or chat_template in "
                    "tokenizer_config.json", "choose one with --template"))
    source = own or (spec.source if spec else None)
    if source is None:
        return report
    tokens = list(dict.fromkeys((*spec.tokens, *([spec.eos] if spec.eos else ())))) if spec else []
    report.findings += _token_findings(model, tokens)
    if spec and spec.eos and tok.eos_token != spec.eos:
        add(Finding("eos-mismatch", f"{spec.name} turns end with {spec.eos!r} but the tokenizer's eos is "
                    f"{tok.eos_token!r}", "tokenizer_config.json eos_token", f"make {spec.eos!r} the eos"))
    stop = stop_test(tok, source, model.generation_eos)
    report.findings += [f for f in stop.findings if f.code != "eos-mismatch" or not (spec and spec.eos)]
    if not stop.text:
        return report
    ends = [i for i in dict.fromkeys(stop.terminators) if i is not None]
    report.end_of_turn = tok.convert_ids_to_tokens(ends)
    config_eos = eos_list(model.config.get("eos_token_id"))
    for tid in ends:
        if tid not in config_eos:
            add(Finding("config-eos", f"config.json eos_token_id does not include the end-of-turn token "
                        f"{tok.convert_ids_to_tokens(tid)!r}", f"eos_token_id {config_eos or 'missing'}, "
                        f"end-of-turn id {tid}", f"set it to {tid}"))
    pad = tok.pad_token_id
    if pad is None:
        add(Finding("pad-missing", "the tokenizer has no pad token", "pad_token is unset",
                    "point pad at an unused token", WARNING))
    elif pad in ends or pad == tok.eos_token_id:
        add(Finding("pad-is-eos", "the pad token is the eos token (training collators then mask every eos)",
                    f"pad_token {tok.pad_token!r} ({pad})", "point pad at an unused token", WARNING))
    if spec and own is not None:
        try:
            differs = render(tok, own, CONVERSATION) != render(tok, spec.source, CONVERSATION)
        except RenderError:
            differs = True
        if differs:
            add(Finding("template-differs", f"the model's chat template renders differently from {spec.name}",
                        "same conversation, different text", "switch to it", WARNING))
    if runtimes:
        report.llama_cpp, finding = _llama_cpp_finding(tok, source)
        if finding is not None:
            add(finding)
    emitted = _emitted_ids(model, stop.text)
    if not spec:
        report.findings += _token_findings(model, tok.convert_ids_to_tokens(emitted))
    if model.has_weights():
        known = [model.token_id(t) for t in tokens]
        report.findings += _weight_findings(model, sorted({*emitted, *ends, *(i for i in known if i is not None)}),
                                            tensors)
    return report


__all__ = ["ERROR", "WARNING", "DoctorReport", "diagnose"]
