"""Pure planning: what one repo needs so that its files equal a local folder (add / update / delete / unchanged).

The remote side is whatever a target reports: for the Hub the tree at one commit (the LFS sha256, or the git blob
sha1 of a regular file), for a ``dir:`` mirror the sha256 of each file. Files are compared by content, never by date.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..stage import Reporter, sha256_file
from .options import PublishError

# Never deleted: the Hub creates it with every repo (LFS rules); a local .gitattributes still replaces it.
PROTECTED = frozenset({".gitattributes"})


def git_blob_sha1(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The git object id of a file's content (what the Hub reports as ``oid`` for a regular file)."""
    digest = hashlib.sha1()
    digest.update(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def wanted(rel: Path) -> bool:
    """Whether a path under a repo folder is part of the repo: hidden files and folders (.git, .cache, releaser's
    temporary names) are not, except a top-level .gitattributes."""
    parts = rel.parts
    if parts == (".gitattributes",):
        return True
    return not any(part.startswith(".") for part in parts)


@dataclass
class LocalFile:
    """A file of a release folder; its hashes are computed when first needed (a new path needs none)."""

    path: str           # relative, forward slashes
    abspath: Path
    size: int
    _sha256: str | None = field(default=None, repr=False)
    _blob: str | None = field(default=None, repr=False)

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = sha256_file(self.abspath)
        return self._sha256

    @property
    def blob_sha1(self) -> str:
        if self._blob is None:
            self._blob = git_blob_sha1(self.abspath)
        return self._blob


@dataclass
class RemoteFile:
    path: str
    size: int
    sha256: str | None = None     # LFS files (Hub)
    blob_sha1: str | None = None  # regular (non-LFS) Hub files
    abspath: Path | None = None   # a dir: mirror's file, hashed when compared

    def content_sha256(self) -> str | None:
        if self.sha256 is None and self.abspath is not None:
            self.sha256 = sha256_file(self.abspath)
        return self.sha256

    def same_content(self, local: LocalFile) -> bool:
        if self.size != local.size:
            return False
        if self.sha256 is not None or self.abspath is not None:
            return self.content_sha256() == local.sha256
        if self.blob_sha1 is not None:
            return self.blob_sha1 == local.blob_sha1
        return False


def list_local(folder: Path) -> list[Path]:
    """The files of a repo folder, sorted by relative path; a symbolic link in it is an error (its target, perhaps
    a system file, is nothing the release made)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        rel_dir = Path(dirpath).relative_to(folder)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in [*dirnames, *filenames]:
            rel = rel_dir / name
            if wanted(rel) and os.path.islink(os.path.join(dirpath, name)):
                raise PublishError(f"{Path(dirpath) / name} is a symbolic link; only regular files are published: "
                                   "replace it with the file itself or remove it")
        for name in filenames:
            rel = rel_dir / name
            if wanted(rel) and os.path.isfile(os.path.join(dirpath, name)):
                out.append(rel)
    return sorted(out, key=lambda p: p.as_posix())


def scan_local(folder: Path) -> dict[str, LocalFile]:
    """Every file of a repo folder with its size (hashes come later, only where a comparison needs them)."""
    return {rel.as_posix(): LocalFile(rel.as_posix(), folder / rel, (folder / rel).stat().st_size)
            for rel in list_local(folder)}


def prehash(repo_id: str, local: dict[str, LocalFile], remote: dict[str, RemoteFile] | None,
            reporter: Reporter) -> None:
    """Hash, with a progress bar, the files the plan will compare by sha256: same path and size on both sides."""
    pairs = [(f, remote[p]) for p, f in local.items() if remote and p in remote and remote[p].size == f.size
             and (remote[p].sha256 is not None or remote[p].abspath is not None)]
    total = sum(f.size * (1 + (r.sha256 is None)) for f, r in pairs)
    if not total:
        return
    with reporter.progress(f"comparing {repo_id}", total=total) as advance:
        for f, r in pairs:
            f.sha256
            advance(f.size)
            if r.sha256 is None:
                r.content_sha256()
                advance(f.size)


ACTIONS = ("add", "update", "delete", "keep", "unchanged")


@dataclass(frozen=True)
class Change:
    path: str
    action: str   # add | update | delete | keep (stale, kept with keep_stale) | unchanged
    size: int     # local size for add/update/unchanged, remote size for delete/keep


@dataclass
class RepoPlan:
    repo_id: str
    changes: list[Change]
    exists: bool = True

    def _of(self, action: str) -> list[Change]:
        return [c for c in self.changes if c.action == action]

    @property
    def uploads(self) -> list[Change]:
        return [c for c in self.changes if c.action in ("add", "update")]

    @property
    def deletions(self) -> list[Change]:
        return self._of("delete")

    @property
    def empty(self) -> bool:
        """Nothing to send and nothing to delete (the repo already equals the folder)."""
        return not self.uploads and not self.deletions and self.exists

    @property
    def bytes_to_send(self) -> int:
        return sum(c.size for c in self.uploads)

    def counts(self) -> dict[str, int]:
        return {a: len(self._of(a)) for a in ACTIONS}

    def bytes(self) -> dict[str, int]:
        return {a: sum(c.size for c in self._of(a)) for a in ACTIONS}

    def summary(self) -> str:
        c, b = self.counts(), self.bytes()
        parts = [f"{c[a]} to {a} ({b[a]} B)" for a in ("add", "update", "delete") if c[a]]
        if c["keep"]:
            parts.append(f"{c['keep']} stale kept")
        parts.append(f"{c['unchanged']} unchanged")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return {"repo_id": self.repo_id, "exists": self.exists, "counts": self.counts(), "bytes": self.bytes(),
                "changes": [{"path": c.path, "action": c.action, "size": c.size} for c in self.changes]}


def plan_repo(repo_id: str, local: dict[str, LocalFile], remote: dict[str, RemoteFile] | None, *,
              keep_stale: bool = False) -> RepoPlan:
    """Compare a local folder with a remote tree (``None``: the repo does not exist yet)."""
    remote_files = remote or {}
    changes = []
    for path in sorted(set(local) | set(remote_files)):
        here, there = local.get(path), remote_files.get(path)
        if here is not None and there is None:
            changes.append(Change(path, "add", here.size))
        elif here is not None:
            changes.append(Change(path, "unchanged" if there.same_content(here) else "update", here.size))
        elif path in PROTECTED:
            continue
        else:
            changes.append(Change(path, "keep" if keep_stale else "delete", there.size))
    return RepoPlan(repo_id, changes, exists=remote is not None)
