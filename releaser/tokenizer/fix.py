"""``releaser fix-tokenizer``: set a chat template and make generation stop at the end of each assistant turn.

Everything is planned in memory (tokenizer through transformers, the JSON configs as dicts, the embedding rows), then
only the files whose content changes are written, atomically (see :mod:`.output`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import AddedToken

from ..checkpoint import CheckpointReader
from ..checkpoint.config import clean_config
from ..errors import ConfigError, ModelError
from .doctor import diagnose
from .findings import ERROR, Finding
from .model import ModelFolder, embedding_names, load_tokenizer, trained_mean, untrained_rows
from .output import check_target, dump_json, write_files, write_with_weights
from .stoptest import CONVERSATION, RenderError, render
from .templates import ChatTemplate, load_template, with_default_system

CONTROL_TOKEN = re.compile(r"<[^<>\s]{1,64}>|\[[A-Z_]{1,32}\]")
END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
NEW_PAD = "<|pad|>"
TOKENIZER_JUNK = ("is_local", "local_files_only")    # loader arguments transformers writes back into tokenizer_config
# tokenizer classes only transformers 5 knows -> the name transformers 4.x and 5.x both load (5's alias of the same)
V5_ONLY_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}
NO_LENGTH = 1e29         # transformers' VERY_LARGE_INTEGER (int(1e30)): "no maximum length known"


def portable_tokenizer_config(cfg: dict, model_config: dict) -> dict:
    """``tokenizer_config.json`` as transformers 4.x and 5.x both load it: a class name both know, the model's
    context length rather than 1e30, additional special tokens under the key 4.x reads as a list."""
    cfg = dict(cfg)
    for key in TOKENIZER_JUNK:
        cfg.pop(key, None)
    if cfg.get("tokenizer_class") in V5_ONLY_CLASSES:
        cfg["tokenizer_class"] = V5_ONLY_CLASSES[cfg["tokenizer_class"]]
    length = cfg.get("model_max_length")
    if isinstance(length, (int, float)) and length >= NO_LENGTH:
        context = model_config.get("max_position_embeddings")
        if isinstance(context, int) and not isinstance(context, bool) and context > 0:
            cfg["model_max_length"] = context
        else:
            del cfg["model_max_length"]
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, list):   # transformers 4.x takes extra_special_tokens as a name -> token mapping
        del cfg["extra_special_tokens"]
        if extra:
            cfg["additional_special_tokens"] = extra
    return cfg


@dataclass
class FixSpec:
    template: str | Path                  # built-in name or .jinja file
    out_dir: Path | None = None           # write a fixed copy here ...
    in_place: bool = False                # ... or change the model folder
    eos: str | None = None                # end-of-turn token (default: the template's, else the tokenizer's eos)
    system_prompt: str | None = None      # default system message for conversations without one
    overwrite: bool = False
    link: bool = False                    # hard-link unchanged files into out_dir (only for releaser's own output)
    stops: tuple[str, ...] = ()           # more tokens that end generation (generation_config's eos list)


@dataclass
class FixReport:
    model_dir: Path
    out_dir: Path
    template: str
    eos_token: str
    eos_ids: list[int]
    pad_token: str
    stop_strings: list[str]
    added_tokens: list[str] = field(default_factory=list)
    repaired_rows: list[int] = field(default_factory=list)
    resized: tuple[int, int] | None = None
    changes: dict[str, list[str]] = field(default_factory=dict)   # file -> diff-like lines
    remaining: list[Finding] = field(default_factory=list)        # doctor findings on the result

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("template", "eos_token", "eos_ids", "pad_token", "stop_strings",
                                             "added_tokens", "repaired_rows", "resized", "changes")}
        return {"model_dir": str(self.model_dir), "out_dir": str(self.out_dir), **out,
                "remaining": [f.to_dict() for f in self.remaining]}


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def json_changes(old: dict | None, new: dict) -> list[str]:
    old = old or {}
    lines = [f"{k}: {_short(old[k])} -> {_short(new[k])}" for k in new if k in old and old[k] != new[k]]
    lines += [f"+ {k}: {_short(new[k])}" for k in new if k not in old]
    return lines + [f"- {k}" for k in old if k not in new]


def _tokenizer_json_changes(old: dict, new: dict) -> list[str]:
    before = {t["id"]: t for t in old.get("added_tokens", [])}
    lines = []
    for t in new.get("added_tokens", []):
        was = before.get(t["id"])
        if was is None:
            lines.append(f"+ added token {t['content']!r} ({t['id']}, special)")
        elif (was["special"], was["normalized"]) != (t["special"], t["normalized"]):
            lines.append(f"{t['content']!r}: special {was['special']} -> {t['special']}, "
                         f"normalized {was['normalized']} -> {t['normalized']}")
    if old.get("post_processor") != new.get("post_processor"):
        lines.append("post_processor: no longer adds BOS (the template writes it)")
    return lines or ["re-serialised by transformers"]


def _check_eos(model: ModelFolder, eos: str | None, tpl: ChatTemplate) -> str:
    """The eos must be a token of the vocabulary, or a control token the template itself defines (added then)."""
    if not eos:
        raise ModelError(f"the tokenizer in {model.path} has no eos token and the template names none; "
                         "pass --eos TOKEN")
    if model.token_id(eos) is not None:
        return eos
    if eos in (tpl.eos, *tpl.tokens) and CONTROL_TOKEN.fullmatch(eos):
        return eos
    existing = model.tokenizer.eos_token
    raise ConfigError(f"--eos {eos!r} is not in the vocabulary and the {tpl.name} template does not define it, so it "
                      "cannot be added (a new token would be untrained); pass an existing token"
                      + (f" such as {existing!r}" if existing else ""))


def _pick_pad(model: ModelFolder, avoid: set[int]) -> str | None:
    """An existing token that can pad: named pad, reserved/unused, unk, then a non-terminating end-of-text token."""
    tok = model.tokenizer

    def rank(content: str) -> int | None:
        low = content.lower()
        if "pad" in low:
            return 0
        if "reserved" in low or "unused" in low:
            return 1
        if content == tok.unk_token:
            return 2
        return 3 if content in END_OF_TEXT else None

    ranked = sorted((r, i, t.content) for i, t in tok.added_tokens_decoder.items()
                    if i not in avoid and (r := rank(t.content)) is not None)
    return ranked[0][2] if ranked else None


def _template_source(tpl: ChatTemplate, model: ModelFolder, system_prompt: str | None) -> str:
    if not system_prompt:
        return tpl.source
    try:
        render(model.tokenizer, tpl.source, [{"role": "system", "content": system_prompt}, *CONVERSATION[:2]])
    except RenderError as exc:
        raise ConfigError(f"template {tpl.name} has no system role ({exc}); drop --system-prompt") from None
    return with_default_system(tpl.source, system_prompt)


def _save_tokenizer(tok, old_dir: Path, control: list[str], model_config: dict) -> dict[str, str]:
    """Save with transformers, make tokenizer_config.json loadable by transformers 4.x and 5.x, force
    special/normalized on ``control``; name -> text."""
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        files = {p.name: p.read_text(encoding="utf-8") for p in Path(tmp).iterdir() if p.is_file()}
    cfg = portable_tokenizer_config(json.loads(files["tokenizer_config.json"]), model_config)
    files["tokenizer_config.json"] = dump_json(cfg)
    if "tokenizer.json" in files:
        data = json.loads(files["tokenizer.json"])
        for t in data.get("added_tokens", []):
            if t["content"] in control:
                t.update(special=True, normalized=False)
        files["tokenizer.json"] = json.dumps(data, indent=2, ensure_ascii=False)
    stm = old_dir / "special_tokens_map.json"
    if stm.is_file():
        legacy = json.loads(stm.read_text())
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = getattr(tok, key, None)
            if value is not None:
                legacy[key] = {**legacy[key], "content": value} if isinstance(legacy.get(key), dict) else value
        files["special_tokens_map.json"] = dump_json(legacy)
    return files


def _weight_edits(model: ModelFolder, size: int, ids: list[int]) -> tuple[dict, list[int], tuple[int, int] | None]:
    """New embedding/lm_head tensors when rows must be added (mean-initialised) or repaired; else ``{}``."""
    if not model.has_weights():
        if size > model.config.get("vocab_size", 0):
            raise ModelError(f"{model.path} has no weights, so releaser cannot add rows for the new tokens; "
                             "run the fix on the complete model folder")
        return {}, [], None
    edits, repaired, resized = {}, set(), None
    with CheckpointReader(model.path) as reader:
        for name in filter(None, embedding_names(reader)):
            matrix = reader.read(name)
            rows = matrix.shape[0]
            bad = untrained_rows(matrix, ids)
            if not bad and size <= rows:
                continue
            mean = trained_mean(matrix).to(matrix.dtype)
            if bad:
                matrix[bad] = mean
                repaired.update(bad)
            if size > rows:
                matrix = torch.cat([matrix, mean.expand(size - rows, -1)])
                resized = (rows, size)
            edits[name] = matrix
    return edits, sorted(repaired), resized


def _stop_ids(model: ModelFolder, tpl: ChatTemplate, eos: str, stops=()) -> list[int]:
    """generation_config's eos list: the end-of-turn id, single-token stop strings, the ``stops`` asked for, then the
    old eos ids."""
    old = model.config.get("eos_token_id")
    ids = [model.token_id(s) for s in tpl.stop_strings(eos)]
    for text in stops:
        if model.token_id(text) is None:
            raise ConfigError(f"tokenizer.eos: {text!r} is not a token of the vocabulary, so generation cannot stop "
                              "on it; list tokens the model emits (the stop audit names them)")
        ids.append(model.token_id(text))
    ids += [*(old if isinstance(old, list) else [old]), *model.generation_eos]
    return [i for i in dict.fromkeys(ids) if i is not None]


def _changed_files(src: Path, files: dict[str, str], template: str, lines: dict[str, list[str]]) -> dict[str, str]:
    """The ``files`` whose content differs from ``src``; a diff-like description of each goes into ``lines``."""
    changed = {}
    for name, content in files.items():
        path = src / name
        old = path.read_text(encoding="utf-8") if path.is_file() else None
        is_json = name.endswith(".json")
        if old is not None and (old == content or (is_json and json.loads(old) == json.loads(content))):
            continue
        changed[name] = content
        if name == "tokenizer.json":
            lines[name] = _tokenizer_json_changes(json.loads(old) if old else {}, json.loads(content))
        elif is_json:
            lines[name] = json_changes(json.loads(old) if old else None, json.loads(content))
        else:
            lines[name] = [f"{'replaced' if old else 'new'}: {template} template ({len(content)} chars)"]
    return changed


def _recheck(model: ModelFolder, files: dict[str, str], config: dict, generation: dict, tpl: ChatTemplate,
             edits: dict) -> list[Finding]:
    """The doctor's findings on the planned result, before anything is written: the tokenizer is reloaded from the
    planned files (in a private temporary folder), the weights are the checkpoint's with ``edits`` applied."""
    with tempfile.TemporaryDirectory(prefix="releaser-recheck-") as tmp:
        for name, content in files.items():
            Path(tmp, name).write_text(content, encoding="utf-8")
        planned = ModelFolder(model.path, config, generation, load_tokenizer(Path(tmp)))
    return diagnose(planned, tpl, tensors=edits).findings


def fix_tokenizer(model_dir: str | Path, spec: FixSpec) -> FixReport:
    """Apply ``spec`` to the model folder ``model_dir`` and return what was changed (see the module docstring)."""
    src = Path(model_dir)
    out = check_target(src, spec.out_dir, spec.in_place, spec.overwrite)
    tpl = spec.template if isinstance(spec.template, ChatTemplate) else load_template(spec.template)
    model = ModelFolder.open(src)
    tok = model.tokenizer
    old_size = len(tok)
    source = _template_source(tpl, model, spec.system_prompt)
    eos = _check_eos(model, spec.eos or tpl.eos or tok.eos_token, tpl)
    control = list(dict.fromkeys([*tpl.tokens, eos]))
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in control], special_tokens=True)
    tok.eos_token = eos
    eos_id = model.token_id(eos)
    avoid = {eos_id, tok.bos_token_id, *(model.token_id(t) for t in control)}
    if tok.pad_token_id is None or tok.pad_token_id == eos_id:
        pad = _pick_pad(model, avoid)
        if pad is None:
            pad = NEW_PAD
            tok.add_tokens([AddedToken(pad, special=True, normalized=False)], special_tokens=True)
        tok.pad_token = pad
    tok.chat_template = source
    try:
        text = render(tok, source, CONVERSATION)
    except RenderError as exc:
        raise ConfigError(f"the {tpl.name} template fails on a plain user/assistant conversation ({exc}); fix the "
                          "template or choose another") from None
    if tok.bos_token_id is not None and tok(text)["input_ids"][:2] == [tok.bos_token_id] * 2:
        tok.add_bos_token = False
    eos_ids = _stop_ids(model, tpl, eos, spec.stops)
    files = _save_tokenizer(tok, src, control, model.config)
    config = dict(clean_config(model.config), eos_token_id=eos_id, pad_token_id=tok.pad_token_id)
    generation = dict(model.generation or {"bos_token_id": tok.bos_token_id}, eos_token_id=eos_ids,
                      pad_token_id=tok.pad_token_id)
    emitted = {i for i in tok(text)["input_ids"] if i in tok.added_tokens_decoder} | {eos_id}
    edits, repaired, resized = _weight_edits(model, len(tok), sorted(emitted))
    if resized:
        config["vocab_size"] = resized[1]
    files["config.json"] = dump_json(config)
    files["generation_config.json"] = dump_json(generation)

    report = FixReport(src, out or src, tpl.name, eos, eos_ids, tok.pad_token, tpl.stop_strings(eos),
                       added_tokens=tok.convert_ids_to_tokens(list(range(old_size, len(tok)))),
                       repaired_rows=repaired, resized=resized)
    report.remaining = _recheck(model, files, config, generation, dataclasses.replace(tpl, source=source), edits)
    errors = [f for f in report.remaining if f.severity == ERROR]
    if errors:
        first = errors[0]
        raise ModelError(f"the fix would leave {len(errors)} error(s), so nothing was written: {first.problem} "
                         f"({first.evidence}); {first.fix}")
    changes = _changed_files(src, files, tpl.name, report.changes)
    if edits:
        for name in edits:
            report.changes[f"weights: {name}"] = (
                ([f"rows {resized[0]} -> {resized[1]} (new rows = mean of trained rows)"] if resized else [])
                + ([f"repaired untrained rows {repaired}"] if repaired else []))
        report.out_dir = write_with_weights(src, out, changes, edits, link=spec.link)
    elif changes or out is not None:
        report.out_dir = write_files(src, out, changes, link=spec.link)
    return report
