"""Writing a fixed model folder: only the changed files in place, or a full copy under a new name; always atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from ..checkpoint import CheckpointReader, CheckpointWriter
from ..checkpoint.writer import DEFAULT_SHARD_BYTES, _os_error
from ..errors import OutputError

WEIGHT_SUFFIXES = (".safetensors", ".bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def dump_json(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name in WEIGHT_INDEXES


def _replace_file(folder: Path, name: str, content: str) -> None:
    tmp = folder / f".{name}.releaser-tmp"
    try:
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, folder / name)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _os_error(exc, folder / name) from exc


def _skip(name: str) -> bool:
    """Never copied into a new folder: git metadata, caches, and releaser's own temporary folders."""
    return name in (".git", ".cache") or (name.startswith(".") and ".releaser-" in name)


def _copy_into(src: Path, dst: Path, changed: dict[str, str], skip_weights: bool) -> None:
    for item in src.iterdir():
        if _skip(item.name) or item.name in changed or (skip_weights and is_weight_file(item.name)):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)
    for name, content in changed.items():
        (dst / name).write_text(content, encoding="utf-8")


def _swap_in(tmp: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.releaser-old"
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def write_files(src: Path, out: Path | None, changed: dict[str, str]) -> Path:
    """Write ``changed`` (name -> text). In place (``out`` None) each file is replaced atomically; otherwise the whole
    folder is copied to a hidden temporary folder beside ``out`` and renamed into place."""
    if out is None:
        for name, content in changed.items():
            _replace_file(src, name, content)
        return src
    tmp = out.parent / f".{out.name}.releaser-tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        _copy_into(src, tmp, changed, skip_weights=False)
        _swap_in(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _os_error(exc, out) from exc
    return out


def write_with_weights(src: Path, out: Path | None, changed: dict[str, str], edits: dict[str, torch.Tensor]) -> Path:
    """Rewrite every tensor (``edits`` replace some) with CheckpointWriter. With ``out`` the other files are copied and
    the folder is committed as a whole; in place, the new weight files replace the old ones file by file (other files
    in the folder, such as .git, stay untouched), then the changed text files are replaced."""
    target = out or src.parent / f".{src.name}.releaser-weights"
    with CheckpointReader(src) as reader:
        specs = []
        for name, info in reader.tensors.items():
            t = edits.get(name)
            specs.append((name, info.dtype, tuple(t.shape) if t is not None else info.shape))
        files = {i.file for i in reader.tensors.values()}
        shard = DEFAULT_SHARD_BYTES
        if len(files) > 1:
            shard = max(os.path.getsize(f) for f in files) + sum(t.numel() * t.element_size() for t in edits.values())
        with CheckpointWriter(target, specs, max_shard_bytes=shard, overwrite=True) as writer:
            with Progress(console=Console(stderr=True), transient=True) as progress:
                task = progress.add_task("writing weights", total=len(specs))
                for name, dtype, _ in specs:
                    t = edits.get(name)
                    writer.write(name, (t if t is not None else reader.read(name)).to(dtype).contiguous())
                    progress.advance(task)
            if out is not None:
                try:
                    _copy_into(src, writer.tmp_dir, changed, skip_weights=True)
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
