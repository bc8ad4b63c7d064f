"""The ``dir:PATH`` target: the same plan applied to local folders ``PATH/OWNER/NAME`` that mirror the repos, so a
release can be inspected (and diffed) before it goes public.

A changed mirror is rebuilt in a temporary folder beside it (unchanged and kept files hard-linked from the old
mirror, new and updated ones copied from the release) and swapped in with one rename (releaser.atomic): a reader
sees the old mirror or the new one, never a half-applied plan. An unchanged mirror is not touched.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..atomic import output_dir
from ..stage import OutputFile, Reporter, sha256_file
from .hub import RepoOutcome
from .options import PublishError, PublishOptions
from .plan import LocalFile, RemoteFile, RepoPlan, list_local, plan_repo, prehash


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_hashed(src: Path, dst: Path, chunk: int = 1 << 22) -> str:
    """Copy a file and return the sha256 of what was read."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(chunk):
            digest.update(block)
            fout.write(block)
    shutil.copystat(src, dst)
    return digest.hexdigest()


@dataclass
class DirTarget:
    root: Path
    reporter: Reporter

    def mirror(self, repo_id: str) -> Path:
        return self.root / repo_id

    def state(self, repo_id: str) -> dict[str, RemoteFile] | None:
        folder = self.mirror(repo_id)
        if not folder.is_dir():
            return None
        return {rel.as_posix(): RemoteFile(rel.as_posix(), (folder / rel).stat().st_size, abspath=folder / rel)
                for rel in list_local(folder)}

    @staticmethod
    def _verify(folder: Path, plan: RepoPlan, written: list[OutputFile]) -> None:
        """The mirror holds exactly the planned paths, and the files copied have the release's content."""
        expected = {c.path for c in plan.changes if c.action != "delete"}
        present = {rel.as_posix() for rel in list_local(folder)}
        bad = sorted(expected ^ present) + [f.path for f in written if sha256_file(folder / f.path) != f.sha256]
        if bad:
            raise PublishError(f"{folder} differs from the plan after publishing ({', '.join(bad[:5])}); run again")

    def publish_repo(self, repo_id: str, local: dict[str, LocalFile], options: PublishOptions,
                     on_plan: Callable[[RepoPlan], None] = lambda plan: None) -> tuple[RepoOutcome, list[OutputFile]]:
        outcome = RepoOutcome(repo_id, attempts=1)
        remote = self.state(repo_id)
        prehash(repo_id, local, remote, self.reporter)
        plan = outcome.plan = plan_repo(repo_id, local, remote, keep_stale=options.keep_stale)
        on_plan(plan)
        if options.dry_run or plan.empty:
            return outcome, []
        folder = self.mirror(repo_id)
        written = []
        try:
            with output_dir(folder, overwrite=True) as tmp:
                for change in plan.changes:
                    if change.action in ("unchanged", "keep"):
                        _link_or_copy(folder / change.path, tmp / change.path)
                    elif change.action in ("add", "update"):
                        digest = _copy_hashed(local[change.path].abspath, tmp / change.path)
                        local[change.path]._sha256 = digest
                        written.append(OutputFile(change.path, change.size, digest))
        except OSError as exc:
            raise PublishError(f"cannot write the mirror {folder}: {exc.strerror or exc}") from None
        outcome.created, outcome.applied = remote is None, True
        self._verify(folder, plan, written)
        self.reporter.message(f"{repo_id}: {plan.summary()} -> {folder}")
        return outcome, [OutputFile(f"{repo_id}/{f.path}", f.size, f.sha256) for f in written]
