"""The publish stage: ``run_publish(options, repos, reporter) -> StageResult``.

``repos`` maps each Hub repo id to its local folder, in publishing order (main repo first: the quant cards link to
it). Each repo is planned against its remote tree (a file is hashed only when a remote file of the same path and
size needs comparing, and at most once) and changed with one commit (or one atomic swap of its ``dir:`` mirror). ``facts["repos"]`` holds each repo's plan and outcome.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from .. import __version__
from ..options import REPO_ID
from ..stage import OutputFile, Reporter, StageResult
from .hub import HubTarget, RepoOutcome
from .local import DirTarget
from .options import PublishError, PublishOptions
from .plan import LocalFile, RepoPlan, list_local, scan_local


def resolve_token(required: bool) -> str | None:
    """The Hub token from HF_TOKEN or the stored login (never shown); a one-line error when required and missing."""
    from huggingface_hub import get_token

    try:
        token = get_token()
    except Exception as exc:  # e.g. a failed OIDC exchange (HF_OIDC_RESOURCE set)
        raise PublishError(f"cannot get a Hugging Face token ({type(exc).__name__}); set HF_TOKEN or run "
                           "`hf auth login`") from None
    if not token and required:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (the token needs write "
                           "access to the repos), or publish to local folders with --to dir:PATH")
    return token or None


def _check_repos(repos: dict[str, Path]) -> dict[str, Path]:
    if not repos:
        raise PublishError("nothing to publish: no repos given")
    checked = {}
    for repo_id, folder in repos.items():
        if not REPO_ID.match(repo_id):
            raise PublishError(f"{repo_id!r} is not a Hub repo id (expected owner/name)")
        folder = Path(folder)
        if not folder.is_dir():
            raise PublishError(f"the folder for {repo_id} does not exist: {folder}")
        if not list_local(folder):
            raise PublishError(f"the folder for {repo_id} is empty: {folder}")
        checked[repo_id] = folder
    return checked


def default_description(options: PublishOptions) -> str:
    version = f" {options.version}" if options.version else ""
    return f"Release{version} published with releaser {__version__}."


def run_publish(options: PublishOptions, repos: dict[str, Path], reporter: Reporter | None = None, *,
                endpoint: str | None = None, sleep: Callable[[float], None] = time.sleep,
                on_plan: Callable[[RepoPlan], None] = lambda plan: None) -> StageResult:
    """Publish each repo's folder to ``options.target``; returns the files sent or written and each repo's plan.
    ``on_plan`` is called with each repo's plan before anything is sent for that repo (the CLI prints it)."""
    reporter = reporter or Reporter()
    repos = _check_repos(repos)
    local = {repo_id: scan_local(folder) for repo_id, folder in repos.items()}
    facts: dict = {"target": options.target, "dry_run": options.dry_run, "collection": None}
    if options.target == "hub":
        output, outcomes, files = _to_hub(options, repos, local, reporter, endpoint, sleep, on_plan, facts)
    else:
        if options.collection:
            reporter.warning(f"collection {options.collection!r} left out: collections exist only on the Hub")
        output = Path(options.target[4:]).absolute()
        facts["where"] = str(output)
        target = DirTarget(output, reporter)
        outcomes, files = [], []
        for repo_id in repos:
            outcome, written = target.publish_repo(repo_id, local[repo_id], options, on_plan)
            outcomes.append(outcome)
            files += written
    facts["repos"] = [o.to_dict() for o in outcomes]
    return StageResult("publish", output, files, _summary(outcomes, options, facts["where"]), facts=facts)


def _to_hub(options: PublishOptions, repos: dict[str, Path], local: dict[str, dict[str, LocalFile]],
            reporter: Reporter, endpoint: str | None, sleep: Callable[[float], None],
            on_plan: Callable[[RepoPlan], None], facts: dict) -> tuple[Path, list[RepoOutcome], list[OutputFile]]:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise PublishError("HF_HUB_OFFLINE is set: unset it to publish to the Hub, or publish to local folders "
                           "with --to dir:PATH")
    target = HubTarget(resolve_token(required=not options.dry_run), reporter=reporter, endpoint=endpoint,
                       sleep=sleep)
    facts["where"] = target.endpoint
    description = options.description or default_description(options)
    outcomes, files = [], []
    for repo_id in repos:
        outcome = target.publish_repo(repo_id, local[repo_id], options, description, on_plan)
        outcomes.append(outcome)
        if (outcome.commit or outcome.landed_earlier) and outcome.plan:
            files += [OutputFile(f"{repo_id}/{c.path}", c.size, local[repo_id][c.path].sha256)
                      for c in outcome.plan.uploads]
    if options.collection and not options.dry_run:
        facts["collection"] = target.add_to_collection(options.collection, list(repos), options.private)
    # the release folder (the common parent of the repo folders) stands for what was published
    return Path(os.path.commonpath([str(p.absolute()) for p in repos.values()])), outcomes, files


def _summary(outcomes: list[RepoOutcome], options: PublishOptions, where: str) -> str:
    plans = [o.plan for o in outcomes if o.plan is not None]
    changed = [p for p in plans if not p.empty]
    sent = sum(p.bytes_to_send for p in changed)
    deleted = sum(len(p.deletions) for p in changed)
    verb = "would publish" if options.dry_run else "published"
    sent_word, deleted_word = ("to send", "to delete") if options.dry_run else ("sent", "deleted")
    text = (f"{verb} {len(outcomes)} repo(s) to {where}: {len(changed)} changed ({sent} B {sent_word}, {deleted} "
            f"file(s) {deleted_word}), {len(plans) - len(changed)} unchanged")
    created = sum(o.created or (o.plan is not None and not o.plan.exists) for o in outcomes)
    if created:
        text += f", {created} {'to create' if options.dry_run else 'created'}"
    prs = [o.pr_url for o in outcomes if o.pr_url]
    if prs:
        text += f"; pull requests: {', '.join(prs)}"
    return text
