"""The publish stage: ``run(options, inputs, out, reporter) -> StageResult`` around
``run_publish(options, repos, reporter) -> StageResult``.

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
from ..options import check_repo_id
from ..stage import OutputFile, Reporter, StageResult, describe_files
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
        try:
            check_repo_id(repo_id)
        except ValueError as exc:
            raise PublishError(str(exc)) from None
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


def _only_recorded(local: dict[str, dict[str, LocalFile]], recorded: dict[str, dict[str, dict]],
                   options: PublishOptions, reporter: Reporter) -> dict[str, list[str]]:
    """Leave out (unless ``include_untracked``) the files no release stage wrote, and check that every recorded file
    is there with the sha256 the manifest holds (read again now), before anything is sent. Returns the untracked
    files per repo."""
    untracked = {}
    for repo_id, files in local.items():
        if repo_id not in recorded:   # a folder no release recorded: all of it is the user's to send
            continue
        extra = sorted(set(files) - set(recorded[repo_id]))
        if extra:
            untracked[repo_id] = extra
            if not options.include_untracked:
                for path in extra:
                    del files[path]
                reporter.warning(f"{repo_id}: {len(extra)} file(s) no release stage wrote left out: "
                                 f"{', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''} (include them with "
                                 "publish.include_untracked: true or --include-untracked)")
    wrong = []
    total = sum(f.size for repo_id, files in local.items() for p, f in files.items() if p in recorded.get(repo_id, {}))
    with reporter.progress("verifying the release's files", total=total) as advance:
        for repo_id, expected in recorded.items():
            for path, want in sorted(expected.items()):
                here = local[repo_id].get(path)
                if here is None:
                    wrong.append((want["stage"], f"{repo_id}/{path} is missing"))
                elif here.size != want["size"] or here.sha256 != want["sha256"]:
                    wrong.append((want["stage"], f"{repo_id}/{path} changed since the {want['stage']} stage wrote it"))
                if here is not None:
                    advance(here.size)
    if wrong:
        stages = ",".join(sorted({stage for stage, _ in wrong}))
        raise PublishError(f"{len(wrong)} file(s) differ from what release.json records, nothing was published: "
                           f"{'; '.join(what for _, what in wrong[:5])}; rebuild with `releaser release RECIPE -o WORK "
                           f"--only {stages} --force` (`releaser verify WORK` lists every difference)")
    return untracked


def run_publish(options: PublishOptions, repos: dict[str, Path], reporter: Reporter | None = None, *,
                endpoint: str | None = None, sleep: Callable[[float], None] = time.sleep,
                on_plan: Callable[[RepoPlan], None] = lambda plan: None,
                recorded: dict[str, dict[str, dict]] | None = None) -> StageResult:
    """Publish each repo's folder to ``options.target``; returns the files sent or written and each repo's plan.
    ``on_plan`` is called with each repo's plan before anything is sent for that repo (the CLI prints it).
    ``recorded`` (repo id -> what :meth:`Manifest.recorded` returns for its folder): only those files are sent, and
    only when their bytes are the recorded ones."""
    reporter = reporter or Reporter()
    repos = _check_repos(repos)
    local = {repo_id: scan_local(folder) for repo_id, folder in repos.items()}
    facts: dict = {"target": options.target, "dry_run": options.dry_run, "collection": None}
    if recorded is not None:
        facts["untracked"] = _only_recorded(local, recorded, options, reporter)
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
    summary = _summary(outcomes, options, facts["where"])
    untracked = sum(map(len, facts.get("untracked", {}).values()))
    if untracked:
        summary += f"; {untracked} untracked file(s) {'sent' if options.include_untracked else 'left out'}"
    return StageResult("publish", output, files, summary, facts=facts)


def run(options: PublishOptions, inputs: dict[str, Path], out: str | os.PathLike, reporter: Reporter | None = None,
        *, recorded: dict[str, dict[str, dict]] | None = None, describe=describe_files) -> StageResult:
    """:func:`run_publish` of the repo folders ``inputs`` (repo id -> folder, main repo first). The result lists the
    mirror folders' files for a ``dir:`` target, nothing for the Hub (it then stands for ``out``)."""
    result = run_publish(options, inputs, reporter, recorded=recorded)
    if options.target == "hub":
        return StageResult("publish", Path(out), [], result.summary, result.facts)
    root = Path(options.target[4:])
    files = [root / repo / f.path for repo in inputs for f in describe(root / repo)]
    return StageResult("publish", root, describe(root, files), result.summary, result.facts)


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
