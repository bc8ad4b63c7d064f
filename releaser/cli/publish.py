"""Terminal side of ``releaser publish``: which folders go to which repos, a rich reporter, the plan tables."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ..errors import ConfigError
from ..options import check_repo_id
from ..stage import StageResult
from .ui import RichReporter
from ..publish.options import PublishOptions
from ..publish.plan import RepoPlan
from ..publish.stage import run_publish

STYLE = {"add": "green", "update": "yellow", "delete": "red", "keep": "dim", "unchanged": "dim"}


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def release_repos(release_dir: Path, recipe_path: Path | None, repo: str | None) -> tuple[dict[str, Path], dict]:
    """Repo id -> folder (main repo first) and the recipe's release facts (version, notes)."""
    facts: dict = {}
    repos: dict[str, Path] = {}
    if recipe_path is not None:
        from ..recipe import load_recipe

        recipe = load_recipe(recipe_path)
        if recipe.releases:
            latest = recipe.releases[0]
            facts = {"version": latest.version,
                     "description": "\n".join(f"- {change}" for change in latest.changes)}
        if repo is None:
            for repo_id in (recipe.name, *recipe.quants.model_dump().values()):
                if repo_id is None:
                    continue
                folder = release_dir / repo_id.split("/", 1)[1]
                if not folder.is_dir():
                    raise ConfigError(f"{release_dir} has no folder {folder.name} for {repo_id}; build the release "
                                      "first or remove the repo from the recipe")
                repos[repo_id] = folder
    if repo is not None:
        try:
            check_repo_id(repo)
        except ValueError as exc:
            raise ConfigError(f"--repo: {exc}") from None
        named = release_dir / repo.split("/", 1)[-1]
        repos[repo] = named if named.is_dir() else release_dir
    if not repos:
        raise ConfigError("which repos? give --recipe RECIPE.yml (repo ids from name and quants) or --repo OWNER/NAME "
                          "for a single folder")
    return repos, facts


def plan_table(plan: RepoPlan) -> Group:
    """The plan of one repo: a heading, then every file that changes and one row for the unchanged ones."""
    changed = [c for c in plan.changes if c.action != "unchanged"]
    if plan.empty:
        state = "unchanged"
    else:
        state = f"{len(plan.uploads)} to send ({human(plan.bytes_to_send)}), {len(plan.deletions)} to delete"
        state = state if plan.exists else f"new repo, {state}"
    heading = Text.assemble((plan.repo_id, "bold"), f" ({state})")
    table = Table()
    table.add_column("action")
    table.add_column("file", overflow="fold")
    table.add_column("size", justify="right")
    for c in changed:
        table.add_row(f"[{STYLE[c.action]}]{c.action}[/]", c.path, human(c.size))
    counts, sizes = plan.counts(), plan.bytes()
    if counts["unchanged"]:
        table.add_row("[dim]unchanged[/]", f"[dim]{counts['unchanged']} file(s)[/]", human(sizes["unchanged"]))
    return Group(heading, table)


def outcome_line(repo: dict) -> str:
    """What happened to one repo (from ``facts["repos"]``)."""
    done = []
    if repo.get("created"):
        done.append("created")
    if repo.get("pr_url"):
        done.append(f"pull request {repo['pr_url']}")
    elif repo.get("commit"):
        done.append(f"commit {repo['commit'][:10]}")
    elif repo.get("applied"):
        done.append("mirror updated")
    if repo.get("landed_earlier"):
        done.append("an earlier attempt's commit had landed")
    if repo.get("tag"):
        done.append(f"tag {repo['tag']}")
    if not (repo.get("applied") or repo.get("pr_url")):
        done.insert(0, "no change")
    return f"{repo['repo_id']}: {', '.join(done)}"


def publish_options(**values) -> PublishOptions:
    try:
        return PublishOptions(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = {"target": "to"}.get(str(err["loc"][0]), str(err["loc"][0]))
        raise ConfigError(f"--{field.replace('_', '-')}: {err['msg'].removeprefix('Value error, ')}") from None


def recorded_files(repos: dict[str, Path]) -> dict[str, dict[str, dict]]:
    """For the repo folders that sit in a release's work folder (``release.json`` beside them): the files its stages
    recorded there (only those are published, and only with their recorded bytes)."""
    from ..pipeline.manifest import NAME, Manifest

    out = {}
    for repo_id, folder in repos.items():
        work = Path(folder).absolute().parent
        if (work / NAME).is_file():
            files = Manifest.open(work, None).recorded(folder)
            if files:
                out[repo_id] = files
    return out


def run_publish_cli(options: PublishOptions, repos: dict[str, Path], out: Console,
                    err: Console, quiet: bool = False) -> StageResult:
    result = run_publish(options, repos, RichReporter(err, quiet=quiet, in_bytes=True),
                         on_plan=lambda plan: out.print(plan_table(plan)), recorded=recorded_files(repos))
    if not options.dry_run:
        for repo in result.facts["repos"]:
            out.print(outcome_line(repo), highlight=False, markup=False)
    out.print(("[yellow]dry run:[/] nothing sent or written; " if options.dry_run else "[green]done:[/] ")
              + result.summary, highlight=False)
    return result
