"""User inputs are never linked into outputs: a ``model:`` release and ``releaser fix-tokenizer -o`` copy (or
reflink) the user's files, so editing an output in place leaves the input as it was; hard links only join files
releaser wrote itself (merged/ and the main folder). Output folders get the user's umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from safety_helpers import model, recipe, run  # noqa: F401 (fixture)

from releaser.reflink import copy_file


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _assert_not_linked(source: Path, out: Path) -> None:
    inputs = {(p.stat().st_dev, p.stat().st_ino) for p in _files(source)}
    shared = [p.name for p in _files(out) if (p.stat().st_dev, p.stat().st_ino) in inputs]
    assert not shared, f"linked to the user's input: {shared}"


def _edit_in_place(path: Path) -> None:
    with open(path, "r+b") as fh:
        first = fh.read(1)
        fh.seek(0)
        fh.write(bytes([first[0] ^ 0xFF]))


@pytest.mark.parametrize("tokenizer", [True, False])
def test_a_model_release_copies_the_users_files(model, tmp_path, tokenizer):
    before = {p.name: p.read_bytes() for p in _files(model)}
    path = recipe(tmp_path, model)
    if not tokenizer:
        path.write_text(f"name: me/Tiny\ndescription: x\nstop_audit: false\nmodel: {model}\n")
    code, output = run("release", path, "-o", tmp_path / "work")
    assert code == 0, output
    main = tmp_path / "work" / "Tiny"
    _assert_not_linked(model, main)
    _edit_in_place(main / "model.safetensors")   # what a user fixing the output by hand may do
    assert {p.name: p.read_bytes() for p in _files(model)} == before


def test_fix_tokenizer_output_copies_the_users_files(model, tmp_path):
    before = {p.name: p.read_bytes() for p in _files(model)}
    code, output = run("fix-tokenizer", model, "--template", "chatml", "-o", tmp_path / "fixed")
    assert code == 0, output
    _assert_not_linked(model, tmp_path / "fixed")
    _edit_in_place(tmp_path / "fixed" / "model.safetensors")
    assert {p.name: p.read_bytes() for p in _files(model)} == before


def test_a_merge_release_links_only_its_own_files(model, tmp_path):
    """merged/ is releaser's output: the main folder may share its unchanged files (no copy of a 70B model), but
    neither shares a file with the user's model."""
    path = tmp_path / "r.yaml"
    path.write_text(f"name: me/Tiny\ndescription: x\nstop_audit: false\nmerge: {{merge_method: linear, models: [{{model: {model}, "
                    "parameters: {weight: 1}}]}\ntokenizer: {template: chatml}\n")
    code, output = run("release", path, "-o", tmp_path / "work")
    assert code == 0, output
    _assert_not_linked(model, tmp_path / "work" / "merged")
    _assert_not_linked(model, tmp_path / "work" / "Tiny")
    assert os.path.samefile(tmp_path / "work" / "merged" / "model.safetensors",
                            tmp_path / "work" / "Tiny" / "model.safetensors")


def test_copy_file_keeps_bytes_and_times_and_takes_the_umask(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(100_000))
    os.chmod(src, 0o600)
    os.utime(src, ns=(1_000_000_000, 2_000_000_000))
    old = os.umask(0o027)
    try:
        copy_file(src, tmp_path / "dst.bin")
    finally:
        os.umask(old)
    dst = tmp_path / "dst.bin"
    assert dst.read_bytes() == src.read_bytes()
    assert stat.S_IMODE(dst.stat().st_mode) == 0o640 and dst.stat().st_mtime_ns == 2_000_000_000
    assert not os.path.samefile(src, dst)


def test_output_folders_get_the_users_umask(model, tmp_path):
    old = os.umask(0o022)
    try:
        code, output = run("release", recipe(tmp_path, model), "-o", tmp_path / "work")
    finally:
        os.umask(old)
    assert code == 0, output
    work = tmp_path / "work"
    for folder in (work, work / "Tiny", work / "published" / "me" / "Tiny"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
    for f in _files(work):
        assert stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044, f   # readable by group and others, as umask 022 says
