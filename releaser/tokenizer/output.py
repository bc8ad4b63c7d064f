"""Writing a fixed model folder: only the changed files in place, or a full copy under a new name; always atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..atomic import OutputLock, os_error as _os_error, output_dir, temp_file, write_file
from ..checkpoint import CheckpointReader, CheckpointWriter, safetensors_io as st
from ..checkpoint.writer import DEFAULT_SHARD_BYTES
from ..errors import OutputError
from ..reflink import copy_file

WEIGHT_SUFFIXES = (".safetensors", ".bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def dump_json(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name in WEIGHT_INDEXES


def _skip(name: str) -> bool:
    """Never copied into a new folder: git metadata, caches, and releaser's own temporary folders."""
    return name in (".git", ".cache") or (name.startswith(".") and ".releaser-" in name)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link an unchanged file of releaser's own output (no copy of a 70B model's shards; every releaser write
    replaces files by rename, so the bytes are never changed through the link); copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_into(src: Path, dst: Path, changed: dict[str, str], skip_weights: bool, skip: set[str] = frozenset(),
               *, link: bool = False) -> None:
    """Copy ``src``'s files (but ``changed``, written instead, and ``skip``) into ``dst``: hard links with ``link``
    (``src`` is releaser's own output), else copies (reflinks where possible: ``src`` is the user's)."""
    copy = _link_or_copy if link else copy_file
    for item in src.iterdir():
        if (_skip(item.name) or item.name in changed or item.name in skip
                or (skip_weights and is_weight_file(item.name))):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name, copy_function=copy)
        else:
            copy(item, dst / item.name)
    for name, content in changed.items():
        (dst / name).write_text(content, encoding="utf-8")


def write_files(src: Path, out: Path | None, changed: dict[str, str], *, link: bool = False) -> Path:
    """Write ``changed`` (name -> text). In place (``out`` None) each file is replaced atomically; otherwise the
    folder is assembled in a temporary folder beside ``out`` (unchanged files copied, or hard-linked with ``link``)
    and renamed into place."""
    if out is None:
        for name, content in changed.items():
            write_file(src / name, content)
        return src
    with output_dir(out, overwrite=True) as tmp:
        try:
            _copy_into(src, tmp, changed, skip_weights=False, link=link)
        except OSError as exc:
            raise _os_error(exc, out) from exc
    return out


def _rewrite_shard(reader: CheckpointReader, file: str, dst: Path, edits: dict[str, torch.Tensor]) -> None:
    """Write ``dst``: the safetensors file ``file`` with ``edits`` applied (same tensor order and metadata)."""
    infos = [i for i in reader.tensors.values() if i.file == file]
    specs = [(i.name, i.dtype, tuple(edits[i.name].shape) if i.name in edits else i.shape) for i in infos]
    metadata = st.read_header(file)[0].get("__metadata__")
    header, offsets = st.layout(specs, metadata)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        st.write_at(fd, header, 0)
        for info in infos:
            t = edits.get(info.name)
            t = (t if t is not None else reader.read(info.name)).to(info.dtype).contiguous()
            if t.numel():
                st.write_at(fd, t.view(torch.uint8).reshape(-1).numpy().data, offsets[info.name])
    finally:
        os.close(fd)


def _rewritten_index(src: Path, reader: CheckpointReader, edits: dict[str, torch.Tensor]) -> str | None:
    index = src / "model.safetensors.index.json"
    if not index.is_file():
        return None
    data = json.loads(index.read_text(encoding="utf-8"))
    total = sum(edits[name].numel() * torch.empty((), dtype=info.dtype).element_size() if name in edits
                else info.nbytes for name, info in reader.tensors.items())
    data.setdefault("metadata", {})["total_size"] = total
    return dump_json(data)


def write_with_weights(src: Path, out: Path | None, changed: dict[str, str], edits: dict[str, torch.Tensor], *,
                       link: bool = False) -> Path:
    """Apply ``edits`` (tensor name -> new value) and the text changes. Only the safetensors files that hold an edited
    tensor are rewritten (under their own names: a 70B model's fix rewrites the shards of embed_tokens and lm_head);
    the others are copied (hard-linked with ``link``) into ``out``, or left alone in place. With ``out`` the folder is committed as a whole;
    in place each rewritten file and then each changed text file replaces its old self atomically."""
    with CheckpointReader(src) as reader:
        files = sorted({reader.tensors[name].file for name in edits})
        if any(not f.endswith(".safetensors") for f in {i.file for i in reader.tensors.values()}):
            return _convert_with_weights(src, out, changed, edits, reader, link=link)
        changed = dict(changed)
        index = _rewritten_index(src, reader, edits)
        if index is not None:
            changed["model.safetensors.index.json"] = index
        rewritten = [Path(f).name for f in files]
        if out is not None:
            with output_dir(out, overwrite=True) as tmp:
                try:
                    for f in files:
                        _rewrite_shard(reader, f, tmp / Path(f).name, edits)
                    _copy_into(src, tmp, changed, skip_weights=False, skip=set(rewritten), link=link)
                except OSError as exc:
                    raise _os_error(exc, out) from exc
            return out
        for f in files:
            with OutputLock(Path(f)), temp_file(Path(f)) as tmp:
                try:
                    _rewrite_shard(reader, f, tmp, edits)
                except OSError as exc:
                    raise _os_error(exc, Path(f)) from exc
    return write_files(src, None, changed)


def _convert_with_weights(src: Path, out: Path | None, changed: dict[str, str], edits: dict[str, torch.Tensor],
                          reader: CheckpointReader, *, link: bool = False) -> Path:
    """``pytorch_model*.bin`` input: every tensor is rewritten as safetensors with CheckpointWriter."""
    target = out or src.parent / f".{src.name}.releaser-weights"
    specs = []
    for name, info in reader.tensors.items():
        t = edits.get(name)
        specs.append((name, info.dtype, tuple(t.shape) if t is not None else info.shape))
    shard = max(DEFAULT_SHARD_BYTES, sum(i.nbytes for i in reader.tensors.values()) // 4)
    with CheckpointWriter(target, specs, max_shard_bytes=shard, overwrite=True) as writer:
        for name, dtype, _ in specs:
            t = edits.get(name)
            writer.write(name, (t if t is not None else reader.read(name)).to(dtype).contiguous())
        if out is not None:
            try:
                _copy_into(src, writer.tmp_dir, changed, skip_weights=True, link=link)
            except OSError as exc:
                raise _os_error(exc, out) from exc
        writer.commit()
    if out is not None:
        return out
    try:
        new = sorted(p.name for p in target.iterdir())
        for name in new:
            os.replace(target / name, src / name)
        for stale in src.iterdir():
            if is_weight_file(stale.name) and stale.name not in new:
                stale.unlink()
        shutil.rmtree(target)
    except OSError as exc:
        raise _os_error(exc, src) from exc
    return write_files(src, None, changed)


def check_target(src: Path, out: Path | None, in_place: bool, overwrite: bool) -> Path | None:
    """Validate -o / --in-place; returns the output folder (None for in place)."""
    if in_place == (out is not None):
        raise OutputError("choose where to write: -o OUT_DIR for a fixed copy, or --in-place to change MODEL_DIR")
    if out is None:
        return None
    out = Path(out).absolute()
    if out == src.absolute():
        raise OutputError(f"{out} is the input folder; use --in-place to change it")
    if out.resolve() in src.resolve().parents:
        raise OutputError(f"{out} holds the input folder {src}, which replacing it would delete; choose another output")
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists; pass --overwrite to replace it or choose a new folder")
    return out
