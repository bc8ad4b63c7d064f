"""``fix_gguf`` (releaser gguf-fix): rewrite an existing GGUF's metadata (chat template, eos, name) without
requantizing. Every other key and every tensor byte is copied unchanged; the new file replaces the target atomically."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGUFValueType as V, Keys

from ..atomic import OutputLock, os_error, sweep, temp_file
from ..checkpoint.config import read_config
from ..errors import ConfigError, ModelError, OutputError
from ..tokenizer.templates import check_renders
from .reader import open_gguf
from .stops import SAMPLING_PREFIX, sampling_values
from .vocab import END_OF_TURN


@dataclass
class FixResult:
    path: Path
    changes: dict[str, tuple[object, object]] = field(default_factory=dict)   # key -> (old, new)

    def summary(self) -> str:
        if not self.changes:
            return f"{self.path}: nothing to change"
        lines = [f"rewrote {self.path} (tensor data copied unchanged):"]
        for key, (old, new) in self.changes.items():
            show = [v if not isinstance(v, str) or len(v) < 60 else v[:57] + "..." for v in (old, new)]
            lines.append(f"  {key}: {show[0]!r} -> {show[1]!r}")
        return "\n".join(lines)


def _value(f: gguf.ReaderField):
    return f.contents()


def _new_values(reader: gguf.GGUFReader, chat_template: str | None, eos: str | None, name: str | None) -> dict:
    """key -> (value, type) for every key to set."""
    new: dict[str, tuple[object, V]] = {}
    if chat_template is not None:
        new[Keys.Tokenizer.CHAT_TEMPLATE] = (chat_template, V.STRING)
    if name is not None:
        new[Keys.General.NAME] = (name, V.STRING)
    if eos is not None:
        tokens_field = reader.get_field(Keys.Tokenizer.LIST)
        if tokens_field is None:
            raise ModelError("the GGUF has no tokenizer.ggml.tokens, so --eos cannot be resolved to an id")
        tokens = _value(tokens_field)
        if eos not in tokens:
            raise ConfigError(f"token {eos!r} is not in the GGUF vocabulary; pass the exact token text, "
                              "e.g. <|im_end|> or <|eot_id|>")
        new[Keys.Tokenizer.EOS_ID] = (tokens.index(eos), V.UINT32)
        if eos in END_OF_TURN:
            new[Keys.Tokenizer.EOT_ID] = (tokens.index(eos), V.UINT32)
    return {key: (value, vtype, None) for key, (value, vtype) in new.items()}


def _special_tokens(reader: gguf.GGUFReader, eos: str | None) -> dict[str, str]:
    """bos_token/eos_token as a chat template sees them (``eos``: the new eos token, when one is set)."""
    tokens = reader.get_field(Keys.Tokenizer.LIST)
    found = {}
    for var, key in (("bos_token", Keys.Tokenizer.BOS_ID), ("eos_token", Keys.Tokenizer.EOS_ID)):
        index = reader.get_field(key)
        if tokens is not None and index is not None and int(_value(index)) < len(tokens.data):
            found[var] = tokens.contents(int(_value(index)))
    return found | ({"eos_token": eos} if eos is not None else {})


def fix_gguf(path, *, chat_template: str | None = None, eos: str | None = None, name: str | None = None,
             out: str | os.PathLike | None = None, overwrite: bool = False) -> FixResult:
    """Set the chat template, eos token (by text) and/or ``general.name`` of ``path``; write to ``out`` (default: in
    place; an existing ``out`` only with ``overwrite``). The result is written under a temporary name beside the
    target and renamed when complete; it keeps ``path``'s file mode. A chat template is checked as ``release``
    checks one (compiled and rendered on a sample conversation in transformers' chat-template sandbox) before
    anything is written."""
    path = Path(path)
    target = Path(out) if out is not None else path
    reader = open_gguf(path)
    if chat_template is not None:
        check_renders(chat_template, "the chat template", **_special_tokens(reader, eos))
    if target.is_dir():
        raise OutputError(f"{target} is a folder; give the path of the .gguf file to write")
    same = target.exists() and target.resolve() == path.resolve()
    if target.exists() and not same and not overwrite:
        raise OutputError(f"{target} already exists; pass --overwrite to replace it or choose another --output")
    return _apply(reader, path, path if same else target, _new_values(reader, chat_template, eos, name))


def sync_tokenizer(path, model_dir: str | os.PathLike) -> FixResult:
    """Make every ``tokenizer.*`` and ``general.sampling.*`` key of the GGUF ``path`` (the first file of a split set)
    what an export of ``model_dir`` would write (vocabulary, special token ids, end-of-generation ids, add_bos/add_eos,
    chat templates, sampling defaults from generation_config.json), in place; tensor bytes
    are copied unchanged. Used to re-release a tokenizer fix without requantizing."""
    from .vocab import add_tokenizer

    path = Path(path)
    reader = open_gguf(path)
    arch = _value(reader.get_field(Keys.General.ARCHITECTURE))
    pre = reader.get_field(Keys.Tokenizer.PRE)
    kind = reader.get_field(Keys.Tokenizer.MODEL)
    if pre is not None and (kind is None or _value(kind) != "gpt2"):
        pre = None   # "default" of a SentencePiece-style vocab is no BPE pre-tokenizer to keep
    template = gguf.GGUFWriter(None, arch)
    config = read_config(model_dir)
    add_tokenizer(template, Path(model_dir), config, _value(pre) if pre is not None else None)
    new = {key: (val.value, val.type, val.sub_type) for key, val in template.kv_data[0].items()
           if key.startswith("tokenizer.")}
    new |= {key: (value, vtype, None) for key, (value, vtype) in sampling_values(model_dir).items()}
    drop = {key for key in reader.fields if key.startswith(("tokenizer.", SAMPLING_PREFIX)) and key not in new}
    return _apply(reader, path, path, new, drop)


def _apply(reader: gguf.GGUFReader, path: Path, target: Path, new: dict, drop: set[str] = frozenset()) -> FixResult:
    changes = {}
    for key, (value, _, _) in new.items():
        old = reader.get_field(key)
        old_value = _value(old) if old is not None else None
        if old_value != value:
            changes[key] = (old_value, value)
    for key in drop:
        changes[key] = (_value(reader.get_field(key)), None)
    if not changes and target == path:
        return FixResult(path, {})
    arch = _value(reader.get_field(Keys.General.ARCHITECTURE))
    with OutputLock(target):
        sweep(target)
        with temp_file(target, mode=path.stat().st_mode & 0o7777) as tmp:
            try:
                _rewrite(reader, tmp, arch, dict(new), drop)
            except OSError as exc:
                raise os_error(exc, target) from exc
    return FixResult(target, changes)


def _rewrite(reader: gguf.GGUFReader, tmp: Path, arch: str, new: dict, drop: set[str]) -> None:
    w = gguf.GGUFWriter(tmp, arch)
    alignment = reader.get_field(Keys.General.ALIGNMENT)
    if alignment is not None:
        w.data_alignment = int(_value(alignment))
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == Keys.General.ARCHITECTURE or key in drop:
            continue
        if key in new:
            w.add_key_value(key, *new.pop(key))
            continue
        vtype = f.types[0]
        sub_type = f.types[-1] if vtype == V.ARRAY else None
        w.add_key_value(key, _value(f), vtype, sub_type)
    for key, (value, vtype, sub_type) in new.items():
        w.add_key_value(key, value, vtype, sub_type)
    for t in reader.tensors:
        w.add_tensor_info(t.name, list(reversed(t.shape.tolist())), np.dtype(np.float32), int(t.n_bytes),
                          raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in reader.tensors:
        w.write_tensor_data(np.asarray(t.data).reshape(-1).view(np.uint8))
    w.close()
