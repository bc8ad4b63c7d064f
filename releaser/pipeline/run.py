"""``run_release``: every stage of a recipe in order, skipping what the manifest shows is done and intact.

A stage runs when it was never run, when its fingerprint (options and input hashes) changed, when one of its files
is missing or changed, with ``force``, or when a stage before it ran and changed its output. Each stage's output is
written atomically and the manifest is saved after each stage, so a run killed at any moment resumes where it was
and ends with the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..recipe import Recipe, load_recipe
from ..stage import Reporter
from .context import Release
from .manifest import Manifest, fingerprint, relative
from .stages import NAMES, STEPS, Step, _merge_config, _template


@dataclass
class StageOutcome:
    name: str
    status: str            # ran | skipped (up to date) | not applicable | left out
    reason: str
    summary: str = ""
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0


@dataclass
class ReleaseResult:
    work: Path
    stages: list[StageOutcome] = field(default_factory=list)
    folders: dict[str, Path] = field(default_factory=dict)

    @property
    def ran(self) -> list[str]:
        return [s.name for s in self.stages if s.status == "ran"]


def _select(names: list[str] | None, flag: str) -> set[str]:
    if not names:
        return set()
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise ConfigError(f"{flag}: unknown stage {unknown[0]!r}; the stages are {', '.join(NAMES)}")
    return set(names)


def _decide(r: Release, step: Step, depends: dict, *, force: bool) -> tuple[bool, str]:
    """(run it?, why)."""
    old = r.manifest.stage(step.name)
    if force:
        return True, "--force"
    if old is None:
        return True, "not run yet"
    if old["fingerprint"] != fingerprint(step.name, depends):
        return True, "its inputs or options changed"
    wrong = r.manifest.intact(r.work / old["root"], old["files"])
    if wrong:
        return True, wrong
    return False, "up to date"


def open_release(recipe_path: str | Path, work_dir: str | Path | None, *, reporter: Reporter | None = None,
                 push: bool = False, force: bool = False) -> Release:
    """The recipe and the work folder's manifest (``work_dir`` None: a recipe check, no work folder)."""
    recipe_path = Path(recipe_path).absolute()
    recipe: Recipe = load_recipe(recipe_path)
    recipe.require_source()
    if work_dir is None:
        return Release(recipe, recipe_path, recipe_path.parent, Manifest(Path("release.json")), Reporter(), push)
    work = Path(work_dir).absolute()
    if work.exists() and not work.is_dir():
        raise ConfigError(f"work folder {work} is a file; choose a folder with -o")
    manifest = Manifest.open(work, recipe.name, force=force)
    return Release(recipe, recipe_path, work, manifest, reporter or Reporter(), push)


def run_release(recipe_path: str | Path, work_dir: str | Path, *, only: list[str] | None = None,
                skip: list[str] | None = None, force: bool = False, dry_run: bool = False, push: bool = False,
                reporter: Reporter | None = None) -> ReleaseResult:
    """Run the recipe's stages into ``work_dir`` (see the module doc); with ``dry_run`` only decide."""
    only_set, skip_set = _select(only, "--only"), _select(skip, "--skip")
    r = open_release(recipe_path, work_dir, reporter=reporter, push=push, force=force)
    r.left_out = frozenset(n for n in NAMES if (only_set and n not in only_set) or n in skip_set)
    _validate(r)
    result = ReleaseResult(r.work, folders=r.repo_folders())
    upstream_ran = False
    if not dry_run:
        r.work.mkdir(parents=True, exist_ok=True)
    for step in STEPS:
        why_not = step.applies(r)
        if why_not:
            result.stages.append(StageOutcome(step.name, "not applicable", why_not))
            if not dry_run:
                r.manifest.forget(step.name)
            continue
        if (only_set and step.name not in only_set) or step.name in skip_set:
            result.stages.append(StageOutcome(step.name, "left out", "--only" if only_set else "--skip"))
            continue
        if dry_run and upstream_ran:
            result.stages.append(StageOutcome(step.name, "would run", "a stage before it runs"))
            continue
        depends = step.depends(r)
        run, why = _decide(r, step, depends, force=force)
        if dry_run:
            result.stages.append(StageOutcome(step.name, "would run" if run else "skipped", why))
            upstream_ran |= run
            continue
        if not run:
            old = r.manifest.stage(step.name)
            result.stages.append(StageOutcome(step.name, "skipped", why, old.get("summary", ""), len(old["files"]),
                                              sum(f["size"] for f in old["files"])))
            continue
        r.reporter.message(f"{step.name}: running ({why})")
        start = time.perf_counter()
        out = step.run(r)
        seconds = time.perf_counter() - start
        old = r.manifest.stage(step.name)
        r.manifest.record(step.name, {
            "fingerprint": fingerprint(step.name, depends), "depends": depends,
            "root": relative(out.output, r.work), "files": [f.to_dict() for f in out.files], "summary": out.summary,
            "facts": out.facts, "seconds": round(seconds, 2),
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "changed": _changes(old["files"] if old else [], [f.to_dict() for f in out.files])})
        upstream_ran = True
        result.stages.append(StageOutcome(step.name, "ran", why, out.summary, len(out.files), out.bytes, seconds))
    return result


def _changes(before: list[dict], after: list[dict]) -> dict[str, list[str]]:
    """Which files a stage added, changed and removed compared with its previous run (shown in the manifest)."""
    old = {f["path"]: f["sha256"] for f in before}
    new = {f["path"]: f["sha256"] for f in after}
    return {"added": sorted(set(new) - set(old)), "removed": sorted(set(old) - set(new)),
            "changed": sorted(p for p in new if p in old and old[p] != new[p])}


@dataclass
class CheckResult:
    recipe: Recipe
    stages: list[StageOutcome]


def check_recipe(recipe_path: str | Path) -> CheckResult:
    """Validate a recipe offline (schema, merge config, templates; Hub model ids are not looked up) and return the
    stages a release would run."""
    r = open_release(recipe_path, None)
    detail = _validate(r)
    stages = []
    for step in STEPS:
        why_not = step.applies(r)
        stages.append(StageOutcome(step.name, "not applicable" if why_not else "runs", why_not or "",
                                   "" if why_not else detail.get(step.name, "")))
    return CheckResult(r.recipe, stages)


def _validate(r: Release) -> dict[str, str]:
    """Check what the schema cannot (the merge config, templates) before anything is written; returns a line per
    stage for the plan."""
    from ..merge.config import parse_config
    from ..tokenizer.templates import load_template

    detail = {}
    if r.recipe.merge is not None:
        source, base_dir = _merge_config(r)
        config, _ = parse_config(source, base_dir=base_dir)
        detail["merge"] = f"{config.merge_method} of {', '.join(config.referenced_models())}"
    else:
        detail["tokenizer"] = f"releases {r.recipe.model}"
    if r.recipe.tokenizer is not None:
        detail["tokenizer"] = f"chat template {load_template(_template(r)).name}"
    if r.recipe.gguf is not None:
        detail["gguf"] = ", ".join(r.recipe.gguf.quants)
    if r.recipe.awq is not None:
        a = r.recipe.awq
        if a.calibration != "builtin" and not r.local(a.calibration).is_file():
            raise ConfigError(f"awq.calibration: {r.local(a.calibration)} does not exist; give a .txt or .jsonl file "
                              "or builtin")
        detail["awq"] = f"{a.bits}-bit g{a.group_size}, {a.samples} samples of {a.calibration}"
    if r.recipe.quality is not False:
        q = r.recipe.quality
        if q.text != "builtin" and not r.local(q.text).is_file():
            raise ConfigError(f"quality.text: {r.local(q.text)} does not exist; give a text file or builtin")
        detail["quality"] = f"{q.chunks} windows of {q.ctx} tokens of {q.text}"
    if r.recipe.card.template and not r.local(r.recipe.card.template).is_file():
        raise ConfigError(f"card.template: {r.local(r.recipe.card.template)} does not exist")
    detail["publish"] = f"{r.recipe.publish.target}: " + ", ".join(r.repo_folders())
    return detail
