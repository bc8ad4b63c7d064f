"""Publishing sends only what the manifest records, with the bytes it records: a stray file in a repo folder is listed
and left out (``publish.include_untracked`` / ``--include-untracked`` send it), a symbolic link is refused, and a
file changed after its stage wrote it (even with its size and mtime kept) stops the publish with the way to rebuild.
``releaser verify WORK`` reads every recorded file again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safety_helpers import model, one_line_error, recipe, release, run  # noqa: F401 (fixture)


def _corrupt(path: Path) -> None:
    """Change one byte, keeping the size and the mtime (what a size+mtime cache cannot see)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _mirror(tmp_path: Path) -> Path:
    return tmp_path / "work" / "published" / "me" / "Tiny"


def test_an_untracked_file_is_listed_and_left_out(model, tmp_path):
    path = release(tmp_path, model, "--skip", "publish")
    (tmp_path / "work" / "Tiny" / "notes.txt").write_text("my private notes\n")
    code, output = run("release", path, "-o", tmp_path / "work")
    assert code == 0, output
    assert "1 file(s) no release stage wrote left out: notes.txt" in " ".join(output.split())
    stages = json.loads((tmp_path / "work" / "release.json").read_text())["stages"]
    assert stages["publish"]["summary"].endswith("; 1 untracked file(s) left out")
    assert stages["publish"]["facts"]["untracked"] == {"me/Tiny": ["notes.txt"]}
    assert (_mirror(tmp_path) / "README.md").is_file()
    assert not (_mirror(tmp_path) / "notes.txt").exists()


def test_include_untracked_sends_them(model, tmp_path):
    release(tmp_path, model, "--skip", "publish", extra="publish: {include_untracked: true}\n")
    (tmp_path / "work" / "Tiny" / "notes.txt").write_text("notes for everyone\n")
    code, output = run("release", tmp_path / "r.yaml", "-o", tmp_path / "work")
    assert code == 0, output
    assert (_mirror(tmp_path) / "notes.txt").read_text() == "notes for everyone\n"


@pytest.mark.parametrize("target", ["/etc/hostname", "folder"])
def test_a_symbolic_link_in_a_repo_folder_is_refused(model, tmp_path, target):
    path = release(tmp_path, model, "--skip", "publish")
    link = tmp_path / "work" / "Tiny" / "linked"
    if target == "folder":
        (tmp_path / "outside").mkdir()
        (tmp_path / "outside" / "secret.txt").write_text("secret\n")
        target = tmp_path / "outside"
    link.symlink_to(target)
    code, output = run("release", path, "-o", tmp_path / "work")
    assert code != 0
    line = one_line_error(output)
    assert f"{link} is a symbolic link; only regular files are published" in line, line
    assert not (tmp_path / "work" / "published").exists()


def test_standalone_publish_of_a_work_folder_follows_its_manifest(model, tmp_path):
    path = release(tmp_path, model, "--skip", "publish")
    (tmp_path / "work" / "Tiny" / "notes.txt").write_text("x\n")
    mirror = tmp_path / "mirror"
    code, output = run("publish", tmp_path / "work", "--recipe", path, "--to", f"dir:{mirror}")
    assert code == 0, output
    assert "left out: notes.txt" in " ".join(output.split())
    assert (mirror / "me" / "Tiny" / "README.md").is_file() and not (mirror / "me" / "Tiny" / "notes.txt").exists()
    code, output = run("publish", tmp_path / "work", "--recipe", path, "--to", f"dir:{mirror}", "--include-untracked")
    assert code == 0, output
    assert (mirror / "me" / "Tiny" / "notes.txt").is_file()


def test_a_corrupted_artefact_is_not_published_and_the_error_says_how_to_rebuild(model, tmp_path):
    path = release(tmp_path, model, "--skip", "publish")
    weights = tmp_path / "work" / "Tiny" / "model.safetensors"
    good = weights.read_bytes()
    _corrupt(weights)
    for command in (["release", path, "-o", tmp_path / "work"],
                    ["publish", tmp_path / "work", "--recipe", path, "--to", f"dir:{tmp_path / 'mirror'}"]):
        code, output = run(*command)
        assert code != 0
        line = one_line_error(output)
        assert "me/Tiny/model.safetensors changed since the tokenizer stage wrote it" in line, line
        assert "nothing was published" in line and "--only tokenizer --force" in line, line
    assert not (tmp_path / "work" / "published").exists() and not (tmp_path / "mirror").exists()
    code, output = run("release", path, "-o", tmp_path / "work", "--only", "tokenizer", "--force")   # as it says
    assert code == 0, output
    assert weights.read_bytes() == good
    code, output = run("release", path, "-o", tmp_path / "work")
    assert code == 0, output
    assert (_mirror(tmp_path) / "model.safetensors").read_bytes() == good


def test_verify_rehashes_everything_recorded(model, tmp_path):
    release(tmp_path, model)
    work = tmp_path / "work"
    code, output = run("verify", work)
    assert code == 0, output
    assert "ok:" in output and "match" in output
    _corrupt(work / "Tiny" / "tokenizer.json")
    _corrupt(_mirror(tmp_path) / "config.json")
    (work / "Tiny" / "README.md").unlink()
    code, output = run("verify", work)
    assert code == 1, output
    assert "tokenizer: Tiny/tokenizer.json: sha256" in output
    assert "publish: published/me/Tiny/config.json: sha256" in output
    assert "cards: Tiny/README.md: missing" in output
    line = one_line_error(output)
    assert "3 of" in line and "--only tokenizer,cards,publish --force" in line, line


def test_verify_needs_a_release_folder(tmp_path):
    code, output = run("verify", tmp_path)
    assert code != 0
    assert "has no release.json; give the work folder of a release" in one_line_error(output)
