"""``run_release``: every stage of a recipe in order, skipping what the manifest shows is done and intact.

A stage runs when it was never run, when its fingerprint (options, input hashes and the versions of the code that makes
its bytes) changed, when one of its files is missing or changed, with ``force``, or when a stage before it ran and
changed its output. Each stage's output is written atomically and the manifest is saved after each stage, so a run
killed at any moment resumes where it was and ends with the same bytes as an uninterrupted run.

The local executor runs the stages in the order of ``STEPS``; an executor whose tasks run side by side (Ray) runs
them as a graph: each stage as soon as the stages it reads (``AFTER``) have finished (:func:`_run_graph`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..arch import FAMILIES, Architecture, find_family
from ..atomic import remove
from ..errors import ConfigError, ReleaserError
from ..recipe import Recipe, load_recipe
from ..stage import Reporter
from .context import Release, require_folder
from .executor import Cancelled, make_executor
from .layout import check_layout
from .lock import WorkLock
from .manifest import Manifest, code_versions, fingerprint, relative
from .stages import AFTER, NAMES, STEPS, Step

UNITS = ".units"   # in the work folder: the units of the stage a killed run was in (see releaser.tasks)


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
        changed = [k for k, v in depends["code"].items() if old["depends"].get("code", {}).get(k) != v]
        if changed:
            return True, f"the code that makes its bytes changed ({', '.join(changed)})"
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
                reporter: Reporter | None = None, strict: bool = False, executor: str | None = None,
                ray_address: str | None = None) -> ReleaseResult:
    """Run the recipe's stages into ``work_dir`` (see the module doc); with ``dry_run`` only decide; with ``strict``
    every warning (a merge parameter the method ignores, ...) is an error. ``executor`` (local, ray; None: the
    recipe's ``executor:`` section) and ``ray_address``: where the stages' tasks run (see executor.py)."""
    only_set, skip_set = _select(only, "--only"), _select(skip, "--skip")
    r = open_release(recipe_path, work_dir, reporter=reporter, push=push, force=force)
    r.left_out = frozenset(n for n in NAMES if (only_set and n not in only_set) or n in skip_set)
    r.strict = strict
    _validate(r)
    for text in r.warnings:
        r.reporter.warning(text)
    if dry_run:
        return _run_steps(r, only_set, skip_set, force=force, dry_run=True)
    e = r.recipe.executor
    kind = executor if executor is not None else ("ray" if ray_address else e.kind)
    r.executor = make_executor(kind, ray_address if ray_address is not None else (e.address if kind == "ray" else None))
    with WorkLock(r.work):
        r.manifest = Manifest.open(r.work, r.recipe.name, force=force)   # as the release before this one left it
        r.executor.start(r.work, r.reporter)
        try:
            return _run_steps(r, only_set, skip_set, force=force, dry_run=False)
        finally:
            r.executor.close()


def _run_steps(r: Release, only_set: set[str], skip_set: set[str], *, force: bool, dry_run: bool) -> ReleaseResult:
    if r.executor.splits and not dry_run:
        return _run_graph(r, only_set, skip_set, force=force)
    result = ReleaseResult(r.work, folders=r.repo_folders())
    upstream_ran = False
    for step in STEPS:
        todo = _prepare(r, step, only_set, skip_set, force=force, dry_run=dry_run, upstream_ran=upstream_ran)
        if isinstance(todo, StageOutcome):
            result.stages.append(todo)
            upstream_ran |= todo.status == "would run"
            continue
        depends, why = todo
        r.reporter.message(f"{step.name}: running ({why})")
        started, start = _now(), time.perf_counter()
        out = step.run(r, _units(r, step.name, depends, force=force))
        result.stages.append(_record(r, step, depends, why, out, started, time.perf_counter() - start))
        upstream_ran = True
    return result


def _included(step: Step, only_set: set[str], skip_set: set[str]) -> bool:
    return not ((only_set and step.name not in only_set) or step.name in skip_set)


def _prepare(r: Release, step: Step, only_set: set[str], skip_set: set[str], *, force: bool,
             dry_run: bool = False, upstream_ran: bool = False) -> StageOutcome | tuple[dict, str]:
    """The row of a stage that does not run (not applicable, left out, up to date; with ``dry_run`` also one that
    would), or (its fingerprint's parts, why it runs). Called when the stages before it (all of them, or its
    prerequisites) have finished."""
    why_not = step.applies(r)
    if why_not:
        if not dry_run:
            r.manifest.forget(step.name)
        return StageOutcome(step.name, "not applicable", why_not)
    if not _included(step, only_set, skip_set):
        return StageOutcome(step.name, "left out", "--only" if only_set else "--skip")
    if dry_run and upstream_ran:
        return StageOutcome(step.name, "would run", "a stage before it runs")
    depends = {**step.depends(r), "code": code_versions(step.code)}
    run, why = _decide(r, step, depends, force=force)
    if dry_run:
        return StageOutcome(step.name, "would run" if run else "skipped", why)
    if not run:   # the row says so, not what the stage did when it last ran
        return StageOutcome(step.name, "skipped", why, "nothing done")
    return depends, why


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def _record(r: Release, step: Step, depends: dict, why: str, out, started: str, seconds: float) -> StageOutcome:
    """The manifest entry of a stage that ran (saved at once) and its row."""
    old = r.manifest.stage(step.name)
    r.manifest.record(step.name, {
        "fingerprint": fingerprint(step.name, depends), "depends": depends,
        "root": relative(out.output, r.work), "files": [f.to_dict() for f in out.files], "summary": out.summary,
        "facts": out.facts, "seconds": round(seconds, 2), "executor": r.executor.kind,
        "tasks": r.executor.log.pop(step.name, []), "started": started, "finished": _now(),
        "changed": _changes(old["files"] if old else [], [f.to_dict() for f in out.files])})
    remove(r.work / UNITS / step.name)   # its units are in its output now
    with contextlib.suppress(OSError):
        (r.work / UNITS).rmdir()   # when no other stage has units there
    return StageOutcome(step.name, "ran", why, out.summary, len(out.files), out.bytes, seconds)


def _run_graph(r: Release, only_set: set[str], skip_set: set[str], *, force: bool) -> ReleaseResult:
    """The stages as a graph (an executor whose tasks run side by side: Ray): each stage starts in a driver thread
    as soon as its prerequisites (``AFTER``) have finished, so the GGUF types, AWQ and the stop audit are on the
    cluster at once. Skip or run is decided as in order: when its prerequisites are done, by its fingerprint. Only
    this thread decides and writes the manifest. The first stage that fails cancels the others' tasks; the stages
    already running end (those in the driver are light), the finished ones are recorded, and its error is raised."""
    result = ReleaseResult(r.work, folders=r.repo_folders())
    rows: dict[str, StageOutcome] = {}
    waiting = list(STEPS)
    running: dict[str, threading.Thread] = {}
    ended: queue.Queue = queue.Queue()   # (step, depends, why, started, seconds, StageResult or exception)
    failure: BaseException | None = None

    def work(step: Step, depends: dict, why: str, units: Path) -> None:
        started, start = _now(), time.perf_counter()
        try:
            value = step.run(r, units)
        except BaseException as exc:   # noqa: BLE001 - handed to the driver's loop, which raises the first one
            value = exc
        ended.put((step, depends, why, started, time.perf_counter() - start, value))

    def fail(exc: BaseException) -> None:
        nonlocal failure
        if failure is None and not isinstance(exc, Cancelled):
            failure = exc
        r.executor.cancel()

    try:
        while waiting or running:
            ready = [s for s in waiting if all(p in rows for p in AFTER[s.name])] if failure is None else []
            for step in ready:
                waiting.remove(step)
                try:
                    todo = _prepare(r, step, only_set, skip_set, force=force)
                except Exception as exc:   # noqa: BLE001 - its depends() failed: ends the release like a stage
                    fail(exc)
                    break
                if isinstance(todo, StageOutcome):
                    rows[step.name] = todo
                    continue
                r.reporter.message(f"{step.name}: running ({todo[1]})")
                units = _units(r, step.name, todo[0], force=force)
                running[step.name] = threading.Thread(target=work, args=(step, *todo, units), daemon=True,
                                                      name=f"releaser {step.name}")
                running[step.name].start()
            if ready and failure is None:
                continue   # a stage that did not run may have made others ready
            if not running:
                break
            step, depends, why, started, seconds, value = ended.get()
            running.pop(step.name).join()
            if isinstance(value, BaseException):
                fail(value)
            else:
                rows[step.name] = _record(r, step, depends, why, value, started, seconds)
    except BaseException:   # Ctrl-C, SIGTERM: the running stages end their tasks before the error goes on
        r.executor.cancel()
        for thread in running.values():
            thread.join(timeout=30)
        raise
    if failure is not None:
        raise failure
    if waiting:   # cannot happen: AFTER follows STEPS' order (checked where it is defined)
        raise RuntimeError(f"stages never ready: {', '.join(s.name for s in waiting)}")
    result.stages = [rows[s.name] for s in STEPS]
    return result


def _units(r: Release, stage: str, depends: dict, *, force: bool) -> Path:
    """Where ``stage`` keeps the units it finished (``WORK/.units/STAGE/FINGERPRINT``), so that a killed release
    takes them instead of making them again; units of another fingerprint (other inputs or options) are removed."""
    folder = r.work / UNITS / stage / fingerprint(stage, depends)[:16]
    if folder.parent.is_dir():
        for old in folder.parent.iterdir():
            if old != folder or force:
                remove(old)
    return folder


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
    warnings: list[str] = field(default_factory=list)
    family: str = ""       # e.g. "Qwen3 (Qwen3ForCausalLM)"; empty while a merge model is on the Hub


def check_recipe(recipe_path: str | Path, *, strict: bool = False) -> CheckResult:
    """Validate a recipe offline with the checks ``run_release`` makes before its first stage (schema, merge config
    and parameters, model folders, templates; Hub model ids are not looked up) and return the stages a release
    would run and the warnings."""
    r = open_release(recipe_path, None)
    r.strict = strict
    detail = _validate(r)
    stages = []
    for step in STEPS:
        why_not = step.applies(r)
        stages.append(StageOutcome(step.name, "not applicable" if why_not else "runs", why_not or "",
                                   "" if why_not else detail.get(step.name, "")))
    return CheckResult(r.recipe, stages, r.warnings, r.family)


def _validate(r: Release) -> dict[str, str]:
    """Check what the schema cannot (the merge config and parameters, the model folders, templates) before anything
    is written, the same for ``check`` and ``release``; returns a line per stage for the plan and puts the warnings
    in ``r.warnings`` (errors with ``r.strict``)."""
    from ..card.render import check_template
    from ..checkpoint import CheckpointReader, architecture_for
    from ..checkpoint.config import check_sizes
    from ..merge.config import parse_config
    from ..merge.params import refuse_warnings
    from ..tokenizer.templates import load_template

    check_layout(r.recipe, r.work)
    detail = {}
    if r.recipe.merge is not None:
        source, base_dir = r.merge_config()
        config, _ = parse_config(source, base_dir=base_dir)
        r.warnings, arch = _check_merge(config)
        detail["merge"] = f"{config.merge_method} of {', '.join(config.referenced_models())}"
    else:
        require_folder(r.source_dir())
        with CheckpointReader(r.source_dir()) as reader:
            config, arch = reader.config, find_family(reader.config)
            if r.recipe.gguf is not None or r.recipe.awq is not None:
                check_sizes(reader, architecture_for(config, str(r.source_dir())))   # before any work
        detail["tokenizer"] = f"releases {r.recipe.model}"
    if arch is not None:
        r.family = f"{arch.label} ({arch.classes[0]})"
    for stage in ("gguf", "awq", "quality"):   # the stages that handle only some families
        if getattr(r.recipe, stage) in (None, False):
            continue
        if arch is None and r.recipe.merge is None:   # a family releaser does not know: the registry's one line
            architecture_for(config, str(r.source_dir()), stage=stage)
        elif arch is not None and not arch.supports(stage):
            handled = ", ".join(a.label for a in FAMILIES if a.supports(stage))
            fix = "set quality: false" if stage == "quality" else f"remove the recipe's {stage} section"
            raise ConfigError(f"{stage}: {arch.label} models are not handled by the {stage} stage yet (it handles "
                              f"{handled}); {fix}")
    if r.recipe.tokenizer is not None:
        detail["tokenizer"] = f"chat template {load_template(r.template()).name}"
    if r.recipe.stop_audit is not False:
        a = r.recipe.stop_audit
        if a.prompts != "builtin" and not r.local(a.prompts).is_file():
            raise ConfigError(f"stop_audit.prompts: {r.local(a.prompts)} does not exist; give a text file with one "
                              "prompt a line or builtin")
        detail["verify"] = (f"doctor; stop audit: {a.samples} answers of up to {a.max_tokens} tokens at temperature "
                            f"{a.temperature:g}")
    if r.recipe.gguf is not None:
        detail["gguf"] = ", ".join(q.name for q in r.recipe.gguf.specs())
        if r.recipe.gguf.imatrix == "auto":
            detail["gguf"] += " with an importance matrix computed by the imatrix stage"
        elif r.recipe.gguf.imatrix is not None:
            from ..gguf.imatrix_weights import ImatrixError, load_imatrix

            path = r.local(r.recipe.gguf.imatrix)
            if not path.is_file():
                raise ConfigError(f"gguf.imatrix: {path} does not exist; give an importance matrix file (llama-imatrix's "
                                  ".gguf or .dat) or false")
            try:
                im = load_imatrix(path)
            except ReleaserError as exc:
                raise ImatrixError(f"gguf.imatrix: {exc}") from None
            detail["gguf"] += f" with the importance matrix {r.recipe.gguf.imatrix} ({len(im.weights)} entries)"
    if r.recipe.awq is not None:
        a = r.recipe.awq
        if a.calibration != "builtin" and not r.local(a.calibration).is_file():
            raise ConfigError(f"awq.calibration: {r.local(a.calibration)} does not exist; give a .txt or .jsonl file "
                              "or builtin")
        detail["awq"] = f"{a.bits}-bit g{a.group_size}, {a.samples} samples of {a.calibration}"
        if a.formats != ["autoawq"]:
            detail["awq"] += f", written as {' and '.join(a.formats)}"
    if r.recipe.mlx is not None:
        m = r.recipe.mlx
        head = "in float" if m.embedding_bits == 16 else f"{m.embedding_bits}-bit"
        detail["mlx"] = ("MLX affine 4-bit from the AWQ pass's codes" if r.recipe.mlx_source == "awq" else
                         f"MLX affine {m.bits}-bit g{m.group_size}") + f", embedding and head {head}"
    if r.recipe.quality is not False:
        q = r.recipe.quality
        if q.text != "builtin" and not r.local(q.text).is_file():
            raise ConfigError(f"quality.text: {r.local(q.text)} does not exist; give a text file or builtin")
        detail["quality"] = f"{q.chunks} windows of {q.ctx} tokens of {q.text}"
    if r.recipe.card.template:
        check_template(r.local(r.recipe.card.template), "card.template")
    refuse_warnings(r.warnings, r.strict)
    detail["publish"] = f"{r.recipe.publish.target}: " + ", ".join(r.repo_folders())
    return detail


def _check_merge(config) -> tuple[list[str], Architecture | None]:
    """The merge's own checks before it reads a tensor: the method and its parameters; when every model is a local
    folder, the whole plan (model counts, layer ranges, values at every layer, filters). A model that is neither a
    folder nor a Hub id is an error; Hub ids are not looked up. Returns the warnings and the models' family (None
    while a model is on the Hub)."""
    from ..merge import hub
    from ..merge.params import check_config
    from ..merge.planner import plan_merge

    warnings = check_config(config)
    refs = config.referenced_models()
    for ref in refs:
        if not hub.is_hub_ref(ref):
            hub.resolve(ref, "adapter" if ref in config.adapters() else "model")   # a local path: it must exist
    if any(hub.is_hub_ref(ref) for ref in refs):
        return warnings, None   # the rest is checked when the merge has the models
    plan = plan_merge(config)
    plan.close()
    return plan.warnings, plan.arch
