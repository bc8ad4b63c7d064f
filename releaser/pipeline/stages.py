"""The stages of a release, in order: a table of :class:`Step`. Each row says when the stage applies, what its
fingerprint is made of (its options and the hashes of its inputs), the folder its files are relative to, the
package whose ``stage.run(options, inputs, out, reporter)`` makes them and what it is called with (built from the
:class:`Release`), and the code that makes its bytes. The runner (``run.py``) skips a stage whose fingerprint and
files match the manifest and runs the others."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ReleaserError
from ..stage import OutputFile, StageResult
from ..tasks import PROCESS_BYTES, Resources, Task, float_bytes
from .context import Release, require_folder
from .manifest import code_versions, fingerprint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json", "added_tokens.json", "tokenizer.model")

Call = tuple[Any, Any, Path, dict]   # a stage's options, inputs, output and keyword arguments


@dataclass(frozen=True)
class Step:
    name: str
    applies: Callable[[Release], str | None]          # None: it runs; else why it does not apply
    depends: Callable[[Release], dict]                # what its fingerprint is made of
    root: Callable[[Release], Path]                   # the folder its recorded files are relative to
    stage: str                                        # the module with run(options, inputs, out, reporter, ...)
    call: Callable[[Release], Call]                   # what run is called with
    code: tuple[str, ...] = ()                        # what makes its bytes (releaser.X subpackages, libraries)
    before: Callable[[Release], None] = lambda r: None   # what must hold before it runs (publish: the gate)
    # a heavy stage: one task an executor may run on another node, with these resources (None: in the driver)
    resources: Callable[[Release], Resources | None] | None = None
    splits: bool = False                              # its run takes run_tasks (units an executor runs side by side)

    def run(self, r: Release, units: Path | None = None) -> StageResult:
        """``units``: the folder where a splitting stage keeps its finished units (see releaser.tasks)."""
        self.before(r)
        options, inputs, out, keywords = self.call(r)
        ex = r.executor
        if self.splits and units is not None:
            keywords["units"] = str(units)
        if self.splits and ex.splits:
            keywords["run_tasks"] = lambda tasks: ex.map(self.name, tasks, r.reporter)
        elif ex.splits and self.resources is not None and (needs := self.resources(r)) is not None:
            # one task, anywhere; it hashes its own files
            task = Task(self.name, f"releaser.{self.stage}:run", (options, inputs, out), keywords, needs)
            return ex.map(self.name, [task], r.reporter)[0].value
        stage = importlib.import_module(f"releaser.{self.stage}")   # on first use: most stages import torch
        return ex.inline(self.name, lambda: stage.run(options, inputs, out, r.reporter, describe=r.manifest.describe,
                                                      **keywords))


def _files(r: Release, stage: str) -> list[dict]:
    entry = r.manifest.stage(stage)
    return entry["files"] if entry else []


def _folder_hashes(r: Release, folder: Path) -> dict[str, str]:
    require_folder(folder)
    return {f.path: f.sha256 for f in r.manifest.describe(folder)}


def _needs(section: str) -> Callable[[Release], str | None]:
    return lambda r: None if getattr(r.recipe, section) is not None else f"the recipe has no {section}: section"


def _always(r: Release) -> None:
    return None


# -- merge -------------------------------------------------------------------------------------------------------------
def _merge_depends(r: Release) -> dict:
    from ..merge import hub
    from ..merge.config import parse_config

    config, base_dir = r.merge_config()
    cfg, text = parse_config(config, base_dir=base_dir)
    adapters = cfg.adapters()
    inputs, where = {}, {}
    for ref in cfg.referenced_models():   # a local folder, or a Hub id's snapshot (fetched once, then cached)
        where[ref] = hub.resolve(ref, "adapter" if ref in adapters else "model")
        inputs[ref] = _folder_hashes(r, Path(where[ref]))
    r.manifest.data["inputs"] = {ref: {"path": where[ref], "files": hashes} for ref, hashes in inputs.items()}
    return {"config": text, "options": r.recipe.merge.model_dump(mode="json", exclude={"inline", "config"}),
            "inputs": inputs}


def _merge_call(r: Release) -> Call:
    return r.recipe.merge, r.recipe_dir, r.merged_dir, {"strict": r.strict, "overwrite": True}


# -- tokenizer: the main repo folder; verify: the doctor and the stop test on it ---------------------------------------
def _source_depends(r: Release) -> dict:
    if r.recipe.merge is not None:
        return {f["path"]: f["sha256"] for f in _files(r, "merge")}
    hashes = _folder_hashes(r, r.source_dir())
    r.manifest.data["inputs"] = {r.recipe.model: {"files": hashes}}
    return hashes


def _tokenizer_options(r: Release):
    """The ``tokenizer:`` section with its template file's path taken from the recipe's folder."""
    t = r.recipe.tokenizer
    return t.model_copy(update={"template": r.template()}) if t is not None else None


def _tokenizer_depends(r: Release) -> dict:
    t = r.recipe.tokenizer
    template = r.template()
    text = Path(template).read_text(encoding="utf-8") if template and Path(template).is_file() else template
    return {"options": t.model_dump(mode="json") if t else None, "template": text, "source": _source_depends(r)}


def _tokenizer_call(r: Release) -> Call:
    # merged/ is releaser's output: hard links; a model: folder is the user's
    return _tokenizer_options(r), r.source_dir(), r.main_dir, {"link": r.recipe.merge is not None, "overwrite": True}


def _audit_options(r: Release):
    """The ``stop_audit:`` section with its prompts file's path taken from the recipe's folder (None: no audit)."""
    a = r.recipe.stop_audit
    if a is False or a.prompts == "builtin":
        return a or None
    return a.model_copy(update={"prompts": str(r.local(a.prompts))})


def _verify_depends(r: Release) -> dict:
    audit = _audit_options(r)
    prompts = Path(audit.prompts) if audit is not None and audit.prompts != "builtin" else None
    return {"template": _tokenizer_depends(r)["template"], "main": {f["path"]: f["sha256"]
                                                                    for f in _files(r, "tokenizer")},
            "stop_audit": audit.model_dump(mode="json") if audit is not None else None,
            **({"prompts": r.manifest.hash(prompts)} if prompts is not None and prompts.is_file() else {})}


def _verify_call(r: Release) -> Call:
    return _tokenizer_options(r), r.main_dir, r.main_dir, {"audit": _audit_options(r)}


# -- gguf and awq: a change of the tokenizer files alone updates them and keeps the tensors ----------------------------
def _main_files(r: Release, tokenizer: bool) -> dict[str, str]:
    """The main folder's tokenizer files (``tokenizer``) or all its other files, path -> sha256."""
    return {f["path"]: f["sha256"] for f in _files(r, "tokenizer") if (f["path"] in TOKENIZER_FILES) == tokenizer}


def _quant_depends(weights: Callable[[Release], dict]) -> Callable[[Release], dict]:
    """A quant stage's fingerprint parts: what its tensors depend on, and the tokenizer files apart (a change of
    those alone is a metadata update, not a new quantization)."""
    return lambda r: {"weights": fingerprint(weights(r)), "tokenizer": _main_files(r, tokenizer=True)}


def _kept(r: Release, stage: str, folder: Path, weights: Callable[[Release], dict]) -> StageResult | None:
    """The stage's last result when its tensors are still right (the same weights fingerprint, its files intact in
    ``folder``): the stage then updates the tokenizer files only."""
    old = r.manifest.stage(stage)
    if old and old["depends"]["weights"] == fingerprint(weights(r)) and r.manifest.intact(folder, old["files"]) is None:
        files = [OutputFile(f["path"], f["size"], f["sha256"]) for f in old["files"]]
        return StageResult(stage, folder, files, old["summary"], old["facts"])
    return None


GGUF_CODE = ("releaser.gguf", "releaser.arch", "releaser.checkpoint", "gguf", "numpy", "numba")
SEARCH_CODE = ("releaser.quality", "releaser.imatrix", "torch", "transformers")   # a recipe search's measurement
AWQ_CODE = ("releaser.awq", "releaser.arch", "releaser.checkpoint", "torch", "transformers")


IMATRIX_CODE = ("releaser.imatrix", "releaser.quality", "releaser.arch", "releaser.checkpoint", "torch",
                "transformers")


def _imatrix_file(r: Release) -> Path | None:
    """The importance matrix the GGUF files are made with: the recipe's file, or the imatrix stage's (auto)."""
    imatrix = r.recipe.gguf.imatrix
    if imatrix == "auto":
        from ..imatrix.stage import file_name

        return r.imatrix_dir / file_name(r.recipe.main_repo.split("/", 1)[1])
    return r.local(imatrix) if imatrix is not None else None


def _imatrix_options(r: Release):
    """The recipe's imatrix: section (its text file relative to the recipe), or the defaults."""
    from ..imatrix.options import BUILTIN, ImatrixOptions

    options = r.recipe.imatrix or ImatrixOptions()
    if options.text != BUILTIN:
        options = options.model_copy(update={"text": str(r.local(options.text))})
    return options


def _imatrix_depends(r: Release) -> dict:
    """The calibration text is rendered through the model's chat template: the whole main folder counts (and a
    text file of the recipe's, by its bytes)."""
    from ..imatrix.options import BUILTIN

    options = _imatrix_options(r)
    text = Path(options.text)
    return {"options": (r.recipe.imatrix or options).model_dump(mode="json"), "model": _main_files(r, tokenizer=True),
            "text": r.manifest.hash(text) if options.text != BUILTIN and text.is_file() else None,
            "code": code_versions(IMATRIX_CODE)}


def _imatrix_call(r: Release) -> Call:
    return _imatrix_options(r), r.main_dir, r.imatrix_dir, {"name": r.recipe.main_repo.split("/", 1)[1],
                                                           "overwrite": True}


def _imatrix_applies(r: Release) -> str | None:
    if r.recipe.gguf is None or r.recipe.gguf.imatrix != "auto":
        return "gguf.imatrix is not auto"
    return None


def _gguf_weights(r: Release) -> dict:
    """What the tensors depend on: everything in the main folder but the tokenizer files, the importance matrix (its
    bytes), and the code."""
    imatrix = _imatrix_file(r)
    return {"options": r.recipe.gguf.model_dump(mode="json"), "license": r.recipe.license, "author": r.recipe.author,
            "tags": list(r.recipe.tags), "language": list(r.recipe.language),
            "name": r.recipe.main_repo, "model": _main_files(r, tokenizer=False),
            "code": code_versions(GGUF_CODE + (SEARCH_CODE if any(s.target for s in r.recipe.gguf.specs()) else ())),
            **({"imatrix": r.manifest.hash(imatrix)} if imatrix is not None else {})}


def _gguf_call(r: Release) -> Call:
    imatrix = _imatrix_file(r)
    return r.recipe.gguf, r.main_dir, r.gguf_dir, {
        "name": r.recipe.main_repo.split("/", 1)[1], "license": r.recipe.license, "base_models": [r.recipe.main_repo],
        "tags": list(r.recipe.tags) or None, "languages": list(r.recipe.language) or None,
        "quantized_by": r.recipe.author, "kept": _kept(r, "gguf", r.gguf_dir, _gguf_weights), "overwrite": True,
        **({"imatrix": str(imatrix)} if imatrix is not None else {})}


def _awq_options(r: Release):
    a = r.recipe.awq
    if a.calibration == "builtin":
        return a
    return a.model_copy(update={"calibration": str(r.local(a.calibration))})


def _awq_weights(r: Release) -> dict:
    """What the quantized tensors depend on: the options, the calibration text, the model's weights and config (not
    its chat template, stop tokens or other tokenizer settings: a fix of those leaves the vocabulary as it is), and the
    code."""
    options = _awq_options(r)
    calib = Path(options.calibration)
    return {"options": r.recipe.awq.model_dump(mode="json", exclude={"device", "formats"}),
            "calibration": r.manifest.hash(calib) if calib.is_file() else options.calibration,
            "model": _main_files(r, tokenizer=False), "code": code_versions(AWQ_CODE)}


def _awq_call(r: Release) -> Call:
    return _awq_options(r), r.main_dir, r.awq_dir, {"kept": _kept(r, "awq", r.awq_dir, _awq_weights),
                                                    "overwrite": True}


# -- runtimes: Ollama's and LM Studio's files in the GGUF repo folder -----------------------------------------------------
def _runtimes_applies(r: Release) -> str | None:
    if r.recipe.gguf is None:
        return "the recipe has no gguf: section"
    if r.recipe.quants.gguf not in r.repo_folders():
        return "no GGUF repo in this run (gguf left out and never made)"
    if not r.recipe.runtimes.files:
        return "runtimes: ollama and lmstudio are off"
    return None


def _runtimes_depends(r: Release) -> dict:
    t = r.recipe.tokenizer
    return {"options": r.recipe.runtimes.model_dump(mode="json"), "repos": [r.recipe.main_repo, r.recipe.quants.gguf],
            "system_prompt": t.system_prompt if t else None, "tokenizer": _main_files(r, tokenizer=True),
            "gguf": _files(r, "gguf"), "template": _go_template(r)}


def _go_template(r: Release) -> str | None:
    """The Go template the runtimes stage may ship for the recipe's chat template (its text, for the fingerprint)."""
    from ..tokenizer.templates import load_template

    return load_template(r.template()).go_template if r.template() else None


def _runtimes_call(r: Release) -> Call:
    t = r.recipe.tokenizer
    return r.recipe.runtimes, (r.main_dir, r.gguf_dir), r.gguf_dir, {
        "main_repo": r.recipe.main_repo, "gguf_repo": r.recipe.quants.gguf,
        "system_prompt": t.system_prompt if t else None, "chat_template": r.template()}


# -- w4a16 and mlx: more formats of the same release ------------------------------------------------------------------
W4A16_CODE = ("releaser.formats", "releaser.awq.pack", "releaser.checkpoint")
MLX_CODE = ("releaser.formats", "releaser.awq.pack", "releaser.arch", "releaser.checkpoint", "torch")


AWQ_LEFT_OUT = "no AWQ folder in this run (awq left out and never made)"


def _w4a16_applies(r: Release) -> str | None:
    if r.recipe.quants.w4a16 is None:
        return "awq.formats has no compressed-tensors"
    return None if r._made("awq") else AWQ_LEFT_OUT


def _mlx_applies(r: Release) -> str | None:
    if r.recipe.mlx is None:
        return "the recipe has no mlx: section"
    return AWQ_LEFT_OUT if r.recipe.mlx_source == "awq" and not r._made("awq") else None


def _w4a16_depends(r: Release) -> dict:
    """A repack of the AWQ folder: its files (codes, tokenizer files and all) and the code."""
    return {"awq": {f["path"]: f["sha256"] for f in _files(r, "awq")}, "code": code_versions(W4A16_CODE)}


def _w4a16_call(r: Release) -> Call:
    from ..formats.options import W4A16Options

    return W4A16Options(), r.awq_dir, r.w4a16_dir, {"overwrite": True}


def _mlx_depends(r: Release) -> dict:
    """Repacked from the AWQ folder or rounded from the main folder (every file of it: the tokenizer files are
    copied beside the weights; a run takes seconds), with the options and the code."""
    options = r.recipe.mlx.model_dump(mode="json")
    if r.recipe.mlx_source == "awq":
        source = {"awq": {f["path"]: f["sha256"] for f in _files(r, "awq")}}
    else:
        source = {"main": {f["path"]: f["sha256"] for f in _files(r, "tokenizer")}}
    return {"options": {**options, "source": r.recipe.mlx_source}, **source, "code": code_versions(MLX_CODE)}


def _mlx_call(r: Release) -> Call:
    source = r.awq_dir if r.recipe.mlx_source == "awq" else r.main_dir
    return r.recipe.mlx, source, r.mlx_dir, {"overwrite": True}


# -- quality: PPL and KLD of every artefact against the main folder ----------------------------------------------------
QUANT_STAGES = ("gguf", "awq", "w4a16", "mlx")


def _artefacts(r: Release) -> list[Path]:
    """The first file of each GGUF type (a split set is read from its first shard; not the NAME.imatrix beside them)
    and the AWQ, W4A16 and MLX folders released."""
    files = [r.gguf_dir / f["path"] for f in _files(r, "gguf")
             if f["path"].endswith(".gguf") and ("-of-" not in f["path"] or "-00001-of-" in f["path"])]
    q = r.recipe.quants
    folders = [d for repo, d in ((q.awq, "awq_dir"), (q.w4a16, "w4a16_dir"), (q.mlx, "mlx_dir")) if repo]
    return sorted(files) + [getattr(r, d) for d in folders]


def _quality_applies(r: Release) -> str | None:
    if r.recipe.quality is False:
        return "quality: false in the recipe"
    if len(r.repo_folders()) == 1:
        return "no quantized artefacts (no gguf:, awq: or mlx: section, or left out)"
    return None


def _quality_depends(r: Release) -> dict:
    q = r.recipe.quality
    text = r.local(q.text) if q.text != "builtin" else None
    return {"options": q.model_dump(mode="json"), "text": r.manifest.hash(text) if text and text.is_file() else q.text,
            "artefacts": {stage: _files(r, stage) for stage in ("tokenizer", *QUANT_STAGES)}}


def _quality_call(r: Release) -> Call:
    q = r.recipe.quality
    options = q if q.text == "builtin" else q.model_copy(update={"text": str(r.local(q.text))})
    return options, [r.main_dir, *_artefacts(r)], r.quality_report, {}


# -- cards --------------------------------------------------------------------------------------------------------------
def _card_template(r: Release) -> Path | None:
    return r.local(r.recipe.card.template) if r.recipe.card.template else None


def _card_depends(r: Release) -> dict:
    recipe = r.recipe.model_dump(mode="json", exclude={"merge", "gguf", "awq", "mlx", "quality", "tokenizer",
                                                       "publish", "executor"})
    template = _card_template(r)
    return {"recipe": recipe, "template": template.read_text(encoding="utf-8") if template else None,
            "folders": {stage: _files(r, stage) for stage in ("tokenizer", *QUANT_STAGES, "runtimes", "quality")}}


def _card_call(r: Release) -> Call:
    quality = r.quality_report if r.manifest.stage("quality") and r.quality_report.is_file() else None
    return r.recipe, list(r.repo_folders().values()), r.work, {"template": _card_template(r), "quality": quality,
                                                               "overwrite": True}


# -- publish ------------------------------------------------------------------------------------------------------------
def _publish_options(r: Release):
    from ..publish.options import PublishOptions

    p = r.recipe.publish
    target = "hub" if r.push else (f"dir:{r.work / p.target[4:]}" if p.target.startswith("dir:") else p.target)
    notes = "\n".join(f"- {c}" for c in r.recipe.releases[0].changes) if r.recipe.releases else None
    fields = p.model_dump(exclude={"repos", "target"})
    fields.update(target=target, version=r.recipe.version, description=p.description or notes)
    return PublishOptions(**fields)


def _publish_applies(r: Release) -> str | None:
    if r.recipe.publish.target == "hub" and not r.push:
        return "publish.target is hub: pass --push to upload"
    return None


def _publish_depends(r: Release) -> dict:
    return {"options": r.recipe.publish.model_dump(mode="json"), "push": r.push, "version": r.recipe.version,
            "notes": [c for rel in r.recipe.releases[:1] for c in rel.changes],
            "artefacts": {stage: _files(r, stage) for stage in ("tokenizer", *QUANT_STAGES, "runtimes", "cards")}}


def _publish_root(r: Release) -> Path:
    options = _publish_options(r)
    return Path(options.target[4:]) if options.target.startswith("dir:") else r.work


def _gate(r: Release) -> None:
    from .gate import check_release

    check_release(r)


def _publish_call(r: Release) -> Call:
    folders = r.repo_folders()
    return _publish_options(r), folders, r.work, {
        "recorded": {repo: r.manifest.recorded(folder) for repo, folder in folders.items()}}


# -- what the heavy stages hold (an executor's task resources), from the tensor shapes ---------------------------------
def _model_memory(r: Release) -> Resources:
    """The main model in float32 once (the stages that run it stream layers, this is an upper bound) and a process."""
    return Resources(cpus=1, memory=PROCESS_BYTES + float_bytes(r.main_dir)[0])


def _verify_resources(r: Release) -> Resources | None:
    """The stop audit generates with the whole model: a task; the doctor alone is light (None: in the driver)."""
    return _model_memory(r) if _audit_options(r) is not None else None


def _merge_resources(r: Release) -> Resources:
    """The merge streams one tensor at a time: each input's largest tensor in float32, three times (inputs, result)."""
    largest = 0
    for entry in r.manifest.data.get("inputs", {}).values():
        path = entry.get("path")
        try:
            largest += float_bytes(path)[1] if path else 0
        except (ReleaserError, OSError):   # an adapter, or no weights of its own: nothing to add
            pass
    gpu = r.recipe.merge.device.startswith("cuda")
    return Resources(cpus=1, memory=PROCESS_BYTES + 3 * largest, gpus=1 if gpu else 0,
                     gpu_reason="merge.device cuda" if gpu else "")


def _awq_resources(r: Release) -> Resources:
    gpu = r.recipe.awq.device == "cuda"
    return Resources(cpus=1, memory=_model_memory(r).memory, gpus=1 if gpu else 0,
                     gpu_reason="awq.device cuda" if gpu else "")


STEPS = [
    Step("merge", _needs("merge"), _merge_depends, lambda r: r.merged_dir, "merge.stage", _merge_call,
         ("releaser.merge", "releaser.arch", "releaser.checkpoint", "torch", "safetensors", "peft"),
         resources=_merge_resources),
    Step("tokenizer", _always, _tokenizer_depends, lambda r: r.main_dir, "tokenizer.stage", _tokenizer_call,
         ("releaser.tokenizer", "releaser.checkpoint", "tokenizers", "transformers")),
    Step("verify", _always, _verify_depends, lambda r: r.main_dir, "tokenizer.verify", _verify_call,
         ("releaser.tokenizer", "releaser.gguf", "transformers", "torch"), resources=_verify_resources),
    Step("imatrix", _imatrix_applies, _imatrix_depends, lambda r: r.imatrix_dir, "imatrix.stage", _imatrix_call,
         IMATRIX_CODE, splits=True),
    Step("gguf", _needs("gguf"), _quant_depends(_gguf_weights), lambda r: r.gguf_dir, "gguf.stage", _gguf_call,
         GGUF_CODE, splits=True),
    Step("runtimes", _runtimes_applies, _runtimes_depends, lambda r: r.gguf_dir, "runtimes.stage", _runtimes_call,
         ("releaser.runtimes", "releaser.gguf", "releaser.card", "releaser.templates", "pyyaml")),
    Step("awq", _needs("awq"), _quant_depends(_awq_weights), lambda r: r.awq_dir, "awq.stage", _awq_call, AWQ_CODE,
         resources=_awq_resources),
    Step("w4a16", _w4a16_applies, _w4a16_depends, lambda r: r.w4a16_dir, "formats.w4a16", _w4a16_call, W4A16_CODE,
         resources=_model_memory),
    Step("mlx", _mlx_applies, _mlx_depends, lambda r: r.mlx_dir, "formats.mlx", _mlx_call, MLX_CODE,
         resources=_model_memory),
    Step("quality", _quality_applies, _quality_depends, lambda r: r.work, "quality.stage", _quality_call,
         ("releaser.quality", "releaser.arch", "releaser.awq", "releaser.gguf", "releaser.formats", "torch",
          "transformers", "llama_cpp_python"), splits=True),
    Step("cards", _always, _card_depends, lambda r: r.work, "card.stage", _card_call,
         ("releaser.card", "releaser.gguf", "releaser.runtimes", "releaser.templates", "jinja2", "huggingface_hub",
          "llama_cpp_python")),
    Step("publish", _publish_applies, _publish_depends, _publish_root, "publish.stage", _publish_call,
         ("releaser.publish", "huggingface_hub"), before=_gate),
]
NAMES = [s.name for s in STEPS]

# What each stage waits for under an executor that runs stages side by side (Ray): the stages whose manifest entries
# or folders its applies, depends, call and before read (tests/test_release_graph.py watches every read). STEPS is
# one order that respects it (the local executor runs them in that order); publish's gate checks every stage.
QUANTS_DONE = ("tokenizer", *QUANT_STAGES)
AFTER: dict[str, tuple[str, ...]] = {
    "merge": (),
    "tokenizer": ("merge",),
    "verify": ("tokenizer",),
    "imatrix": ("tokenizer",),
    "gguf": ("tokenizer", "imatrix"),
    "runtimes": ("tokenizer", "gguf"),
    "awq": ("tokenizer",),
    "w4a16": ("awq",),
    "mlx": ("tokenizer", "awq"),
    "quality": QUANTS_DONE,
    "cards": (*QUANTS_DONE, "runtimes", "quality"),
    "publish": tuple(n for n in NAMES if n != "publish"),
}
assert list(AFTER) == NAMES and all(NAMES.index(p) < NAMES.index(n) for n, ps in AFTER.items() for p in ps)
