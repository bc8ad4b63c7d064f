"""The Hugging Face Hub target: plan against the remote tree, one ``create_commit`` per repo with exactly the planned
operations, an optional pull request, a tag, and a check that the remote tree equals the folder afterwards.

The transfer itself (preupload, LFS/Xet, skipping content the server has) is huggingface_hub's. The client retries
transfers but not the commit POST, and a 5xx can arrive after a commit landed: a failed attempt is therefore
followed by a fresh read of the remote tree and a new plan (empty when the commit had landed), with a bounded
backoff that honours ``Retry-After``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.hf_api import RepoFile

from ..stage import Reporter
from .failures import (TRANSPORT_ERRORS, UNREACHABLE, auth_error, is_transient, one_line, retry_after, root_cause,
                       status_of)
from .options import PublishError, PublishOptions
from .plan import LocalFile, RemoteFile, RepoPlan, plan_repo, prehash


@contextmanager
def hub_progress_bars(shown: bool) -> Iterator[None]:
    """huggingface_hub's own upload bars (LFS, Xet) on stderr only while the reporter shows progress: never for the
    library's silent reporter or with ``-q``."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    (enable_progress_bars if shown else disable_progress_bars)()
    try:
        yield
    finally:
        (disable_progress_bars if was_disabled else enable_progress_bars)()


@dataclass
class RemoteState:
    head: str
    private: bool
    files: dict[str, RemoteFile]


@dataclass
class RepoOutcome:
    repo_id: str
    plan: RepoPlan | None = None       # the plan as first computed (what the table shows)
    created: bool = False
    commit: str | None = None          # the commit made by this run
    landed_earlier: bool = False       # a failed attempt's commit turned out to have landed
    applied: bool = False              # this run's changes are in place (a commit, or a swapped dir: mirror)
    pr_url: str | None = None
    tag: str | None = None             # tag now on the repo's head
    attempts: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"repo_id": self.repo_id, "plan": self.plan.to_dict() if self.plan else None,
                "created": self.created, "commit": self.commit, "landed_earlier": self.landed_earlier,
                "applied": self.applied,
                "pr_url": self.pr_url, "tag": self.tag, "attempts": self.attempts, "notes": list(self.notes)}


class HubTarget:
    """Publishes repos to a Hub endpoint (``HF_ENDPOINT``, read when the target is made, or https://huggingface.co)."""

    def __init__(self, token: str | None, *, reporter: Reporter, endpoint: str | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        from .. import __version__

        endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
        self.api = HfApi(endpoint=endpoint, token=token if token else False, library_name="releaser",
                         library_version=__version__)
        self.endpoint = self.api.endpoint
        self.reporter = reporter
        self.sleep = sleep

    # -- reading ---------------------------------------------------------------------------------------------

    def state(self, repo_id: str, revision: str = "main") -> RemoteState | None:
        """Head commit and files of ``revision`` (None when the repo does not exist)."""
        try:
            info = self.api.repo_info(repo_id, revision=revision)
        except RepositoryNotFoundError:
            return None
        head = info.sha
        files = {}
        for entry in self.api.list_repo_tree(repo_id, recursive=True, revision=head or revision):
            if isinstance(entry, RepoFile):
                files[entry.path] = self._remote(entry)
        return RemoteState(head, bool(info.private), files)

    def tree(self, repo_id: str, revision: str) -> dict[str, RemoteFile]:
        return {e.path: self._remote(e) for e in self.api.list_repo_tree(repo_id, recursive=True, revision=revision)
                if isinstance(e, RepoFile)}

    @staticmethod
    def _remote(entry: RepoFile) -> RemoteFile:
        if entry.lfs is not None:
            return RemoteFile(entry.path, entry.size, sha256=entry.lfs.sha256)
        return RemoteFile(entry.path, entry.size, blob_sha1=entry.blob_id)

    # -- one repo --------------------------------------------------------------------------------------------

    def publish_repo(self, repo_id: str, local: dict[str, LocalFile], options: PublishOptions, description: str,
                     on_plan: Callable[[RepoPlan], None] = lambda plan: None) -> RepoOutcome:
        """Plan (``on_plan`` sees it before anything is sent), commit with retries, verify, tag."""
        outcome = RepoOutcome(repo_id)
        revision, head = "main", None
        for attempt in range(1, options.retries + 1):
            outcome.attempts = attempt
            try:
                state = self.state(repo_id, revision)
                prehash(repo_id, local, state.files if state else None, self.reporter)
                if options.dry_run:
                    outcome.plan = plan_repo(repo_id, local, state.files if state else None,
                                             keep_stale=options.keep_stale)
                    on_plan(outcome.plan)
                    return outcome
                if state is None:
                    self.api.create_repo(repo_id, private=options.private, exist_ok=True)
                    outcome.created = True
                    self.reporter.message(f"{repo_id}: created ({'private' if options.private else 'public'})")
                    state = self.state(repo_id, revision)
                    if state is None:
                        raise PublishError(f"{repo_id} was created but cannot be read back; check the token's "
                                           "permissions")
                elif attempt == 1 and options.private and not state.private:
                    outcome.notes.append("repo exists and is public; --private applies only to new repos")
                    self.reporter.warning(f"{repo_id} exists and is public; --private only applies to new repos")
                plan = plan_repo(repo_id, local, state.files, keep_stale=options.keep_stale)
                if outcome.plan is None:
                    outcome.plan = plan
                    on_plan(plan)
                head = state.head
                if plan.empty:
                    if attempt > 1 and outcome.commit is None:
                        outcome.landed_earlier = outcome.applied = True
                        outcome.notes.append("the failed attempt's commit had landed; nothing left to send")
                    break
                if options.create_pr and revision == "main":
                    if existing := self._open_pr_with(repo_id, local, options):
                        revision, outcome.pr_url = existing
                        outcome.notes.append(f"the open pull request {existing[1]} already has these changes")
                        self.reporter.message(f"{repo_id}: the open pull request {existing[1]} already has these "
                                              "changes")
                        break
                    pr = self.api.create_pull_request(repo_id, title=options.commit_title, description=description)
                    revision = pr.git_reference or "main"
                    outcome.pr_url = pr.url
                    self.reporter.message(f"{repo_id}: opened pull request {pr.url}")
                    state = self.state(repo_id, revision)
                    plan = plan_repo(repo_id, local, state.files if state else {}, keep_stale=options.keep_stale)
                self.reporter.message(f"{repo_id}: committing {plan.summary()} (attempt {attempt})")
                with hub_progress_bars(self.reporter.shows_progress):
                    info = self.api.create_commit(repo_id, self._operations(plan, local),
                                                  commit_message=options.commit_title, commit_description=description,
                                                  revision=revision, parent_commit=state.head if state else None)
                outcome.commit = head = info.oid
                outcome.applied = True
                break
            except PublishError:
                raise
            except (HfHubHTTPError, RuntimeError, ValueError, *TRANSPORT_ERRORS) as exc:
                self._handle_failure(exc, repo_id, attempt, options)
        if outcome.commit is not None:  # otherwise the last plan, read just now, was already empty
            self._verify(repo_id, local, outcome.commit, options)
        if options.tag_name and revision == "main" and head:
            outcome.tag = self._tag(repo_id, options.tag_name, head, options.commit_title)
        return outcome

    def _open_pr_with(self, repo_id: str, local: dict[str, LocalFile], options: PublishOptions,
                      newest: int = 5) -> tuple[str, str] | None:
        """An open pull request (among the ``newest``) whose files already equal the folder: (ref, url)."""
        refs = self.api.list_repo_refs(repo_id, include_pull_requests=True).pull_requests or []
        numbered = sorted(((int(r.ref.rsplit("/", 1)[1]), r.ref) for r in refs
                           if r.ref.rsplit("/", 1)[-1].isdigit()), reverse=True)
        for num, ref in numbered[:newest]:
            if plan_repo(repo_id, local, self.tree(repo_id, ref), keep_stale=options.keep_stale).empty:
                details = self.api.get_discussion_details(repo_id, num)
                if details.status in ("open", "draft"):
                    return ref, details.url
        return None

    @staticmethod
    def _operations(plan: RepoPlan, local: dict[str, LocalFile]) -> list:
        ops: list = []
        for c in plan.uploads:
            op = CommitOperationAdd(path_in_repo=c.path, path_or_fileobj=str(local[c.path].abspath))
            local[c.path]._sha256 = op.upload_info.sha256.hex()  # the client hashed it: no second pass
            ops.append(op)
        ops += [CommitOperationDelete(path_in_repo=c.path, is_folder=False) for c in plan.deletions]
        return ops

    def _handle_failure(self, exc: BaseException, repo_id: str, attempt: int, options: PublishOptions) -> None:
        """Raise a one-line PublishError for a permanent failure or the last attempt; otherwise wait."""
        if err := auth_error(exc, repo_id):
            raise err from None
        cause = root_cause(exc)
        if isinstance(cause, UNREACHABLE):
            raise PublishError(f"cannot reach {self.endpoint} ({one_line(cause)}); check the network or "
                               "HF_ENDPOINT, then run again") from None
        reason = one_line(cause if cause is not exc and isinstance(cause, HfHubHTTPError) else exc)
        if isinstance(exc, ValueError) and not isinstance(exc, HfHubHTTPError):
            raise PublishError(f"{repo_id}: the Hub refused the commit: {reason}") from None
        if not is_transient(exc):
            raise PublishError(f"{repo_id}: {reason}") from None
        if attempt >= options.retries:
            raise PublishError(f"{repo_id}: giving up after {attempt} attempts ({reason}); run the same command "
                               "again to resume (files already on the Hub are not sent again)") from None
        hinted = retry_after(cause)
        status = status_of(cause)
        if hinted is not None and hinted > options.max_wait:
            raise PublishError(f"{repo_id}: {'rate limited by the Hub (429)' if status == 429 else reason}; the Hub "
                               f"asks to retry after {hinted:.0f} s; run the same command again then") from None
        wait = hinted if hinted is not None else min(options.max_wait, float(2 ** (attempt - 1)))
        if status == 429:
            self.reporter.warning(f"{repo_id}: rate limited by the Hub (429); waiting {wait:.0f} s before retrying "
                                  f"(attempt {attempt + 1}/{options.retries})")
        else:
            self.reporter.warning(f"{repo_id}: attempt {attempt} failed ({reason}); re-reading the repo and "
                                  f"retrying in {wait:.0f} s (attempt {attempt + 1}/{options.retries})")
        self.sleep(wait)

    def _verify(self, repo_id: str, local: dict[str, LocalFile], revision: str, options: PublishOptions) -> None:
        try:
            files = self.tree(repo_id, revision)
        except (HfHubHTTPError, *TRANSPORT_ERRORS) as exc:
            raise PublishError(f"{repo_id}: cannot read the tree back to verify it ({one_line(exc)}); run the same "
                               "command again to check") from None
        after = plan_repo(repo_id, local, files, keep_stale=options.keep_stale)
        if not after.empty:
            raise PublishError(f"{repo_id}: after publishing, the Hub tree differs from the folder ({after.summary()})"
                               "; run the same command again")

    def add_to_collection(self, title: str, repo_ids: list[str], private: bool) -> dict:
        """Add the repos to the collection ``title`` in the first repo's namespace (made if missing); idempotent."""
        namespace = repo_ids[0].split("/", 1)[0]
        try:
            collection = self.api.create_collection(title, namespace=namespace, private=private, exists_ok=True)
            present = {item.item_id for item in collection.items}
            added = [r for r in repo_ids if r not in present]
            for repo_id in added:
                self.api.add_collection_item(collection.slug, repo_id, "model", exists_ok=True)
        except (HfHubHTTPError, *TRANSPORT_ERRORS) as exc:
            if err := auth_error(exc, f"the collection {title!r}"):
                raise err from None
            raise PublishError(f"cannot add the repos to the collection {title!r} ({one_line(exc)}); run the "
                               "same command again") from None
        if added:
            self.reporter.message(f"collection {collection.slug}: added {', '.join(added)}")
        return {"slug": collection.slug, "added": added}

    def _tag(self, repo_id: str, tag: str, head: str, message: str) -> str | None:
        try:
            tags = {t.name: t.target_commit for t in self.api.list_repo_refs(repo_id).tags}
            if tag not in tags:
                self.api.create_tag(repo_id, tag=tag, revision=head, tag_message=message, exist_ok=True)
                self.reporter.message(f"{repo_id}: tagged {tag}")
                return tag
        except (HfHubHTTPError, *TRANSPORT_ERRORS) as exc:
            if err := auth_error(exc, repo_id):
                raise err from None
            raise PublishError(f"{repo_id}: cannot tag {tag} ({one_line(exc)}); run the same command again") from None
        if tags[tag] == head:
            return tag
        self.reporter.warning(f"{repo_id}: tag {tag} already names an older commit and was left as is; give the "
                              "release a new version to tag this one")
        return None
