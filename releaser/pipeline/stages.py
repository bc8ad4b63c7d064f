"""The stages of a release, in order. Each is a :class:`Step`: when it applies, the fingerprint of what it depends on
(its options and the hashes of its inputs), where its files are, and how to run it. The runner (``run.py``) skips a
stage whose fingerprint and files match the manifest and runs the others."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..atomic import output_dir
from ..errors import GateError
from ..stage import StageResult
from .context import Release, require_folder
from .manifest import code_versions, fingerprint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json", "added_tokens.json", "tokenizer.model")


@dataclass(frozen=True)
class Step:
    name: str
    applies: Callable[[Release], str | None]          # None: it runs; else why it does not apply
    depends: Callable[[Release], dict]                # what its fingerprint is made of
    root: Callable[[Release], Path]                   # the folder its recorded files are relative to
    run: Callable[[Release], StageResult]
    code: tuple[str, ...] = ()                         # what makes its bytes (releaser.X subpackages, libraries)


def _files(r: Release, stage: str) -> list[dict]:
    entry = r.manifest.stage(stage)
    return entry["files"] if entry else []


def _folder_hashes(r: Release, folder: Path) -> dict[str, str]:
    require_folder(folder)
    return {f.path: f.sha256 for f in r.manifest.describe(folder)}


def _result(r: Release, stage: str, root: Path, summary: str, paths: list[Path] | None = None,
            facts: dict | None = None) -> StageResult:
    return StageResult(stage, root, r.manifest.describe(root, paths), summary, facts or {})


# -- merge -------------------------------------------------------------------------------------------------------------
def _merge_depends(r: Release) -> dict:
    from ..merge.config import parse_config

    from ..merge import hub

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


def _merge_run(r: Release) -> StageResult:
    from ..checkpoint import parse_size
    from ..merge import run_merge

    m = r.recipe.merge
    config, base_dir = r.merge_config()
    result = run_merge(config, r.merged_dir, device=m.device, overwrite=True, max_shard_bytes=parse_size(m.shard_size),
                       reporter=r.reporter, base_dir=base_dir, strict=r.strict)
    return _result(r, "merge", r.merged_dir, f"merged {result.tensors} tensors with {result.method}")


# -- tokenizer: the main repo folder --------------------------------------------------------------------------------
def _source_depends(r: Release) -> dict:
    if r.recipe.merge is not None:
        return {f["path"]: f["sha256"] for f in _files(r, "merge")}
    hashes = _folder_hashes(r, r.source_dir())
    r.manifest.data["inputs"] = {r.recipe.model: {"files": hashes}}
    return hashes


def _tokenizer_depends(r: Release) -> dict:
    t = r.recipe.tokenizer
    template = r.template()
    text = Path(template).read_text(encoding="utf-8") if template and Path(template).is_file() else template
    return {"options": t.model_dump(mode="json") if t else None, "template": text, "source": _source_depends(r)}


def _tokenizer_run(r: Release) -> StageResult:
    t = r.recipe.tokenizer
    own = r.recipe.merge is not None   # merged/ is releaser's output: hard links; a model: folder is the user's
    if t is None:   # no fix asked for: the main folder is the source as it is
        from ..tokenizer.output import _copy_into

        with output_dir(r.main_dir, overwrite=True) as tmp:
            _copy_into(r.source_dir(), tmp, {}, skip_weights=False, skip={"README.md"}, link=own)
        return _result(r, "tokenizer", r.main_dir, "copied the model as it is (no tokenizer: section)")
    from ..tokenizer.fix import FixSpec, fix_tokenizer

    report = fix_tokenizer(r.source_dir(), FixSpec(r.template(), r.main_dir, False, t.eos, t.system_prompt,
                                                    overwrite=True, link=own))
    return _result(r, "tokenizer", r.main_dir,
                   f"{report.template}: eos {report.eos_token!r}, stop ids {report.eos_ids}, "
                   f"{len(report.changes)} file(s) changed", facts={"changes": report.changes,
                                                                    "stop_strings": report.stop_strings})


# -- verify: doctor and stop test on the main folder ----------------------------------------------------------------
def _verify_depends(r: Release) -> dict:
    return {"template": _tokenizer_depends(r)["template"], "main": {f["path"]: f["sha256"]
                                                                    for f in _files(r, "tokenizer")}}


def _verify_run(r: Release) -> StageResult:
    from ..tokenizer.doctor import diagnose

    report = diagnose(r.main_dir, r.template())
    if not report.clean:
        problems = "; ".join(f"{f.problem} ({f.fix})" for f in report.findings if f.severity == "error")
        raise GateError(f"{r.main_dir} fails the doctor: {problems}")
    return StageResult("verify", r.main_dir, [], f"doctor clean: turns end with {report.end_of_turn}, generation "
                       f"eos ids {report.generation_eos}", {"doctor": report.to_dict()})


# -- gguf ---------------------------------------------------------------------------------------------------------------
def _main_files(r: Release, tokenizer: bool) -> dict[str, str]:
    """The main folder's tokenizer files (``tokenizer``) or all its other files, path -> sha256."""
    return {f["path"]: f["sha256"] for f in _files(r, "tokenizer") if (f["path"] in TOKENIZER_FILES) == tokenizer}


def _quant_depends(weights: Callable[[Release], dict]) -> Callable[[Release], dict]:
    """A quant stage's fingerprint parts: what its tensors depend on, and the tokenizer files apart (a change of
    those alone is a metadata update, not a new quantization)."""
    return lambda r: {"weights": fingerprint(weights(r)), "tokenizer": _main_files(r, tokenizer=True)}


GGUF_CODE = ("releaser.gguf", "releaser.arch", "releaser.checkpoint", "gguf", "numpy", "numba")
AWQ_CODE = ("releaser.awq", "releaser.arch", "releaser.checkpoint", "torch", "transformers")


def _gguf_weights(r: Release) -> dict:
    """What the tensors depend on: everything in the main folder but the tokenizer files, and the code."""
    return {"options": r.recipe.gguf.model_dump(mode="json"), "license": r.recipe.license, "author": r.recipe.author,
            "name": r.recipe.main_repo, "model": _main_files(r, tokenizer=False), "code": code_versions(GGUF_CODE)}


def _gguf_run(r: Release) -> StageResult:
    """A full export, or -- when only the tokenizer files changed and the files are intact -- a rewrite of each
    file's tokenizer metadata with the tensor bytes copied unchanged (a tokenizer fix is not requantized)."""
    old = r.manifest.stage("gguf")
    if old and old["depends"]["weights"] == fingerprint(_gguf_weights(r)) and \
            r.manifest.intact(r.gguf_dir, old["files"]) is None:
        from ..gguf.fix import sync_tokenizer

        changed = []
        for f in old["files"]:
            path = r.gguf_dir / f["path"]
            if "-of-" in path.name and "-00001-of-" not in path.name:
                continue   # metadata lives in the first file of a split set
            if sync_tokenizer(path, r.main_dir).changes:
                changed.append(path.name)
        paths = [r.gguf_dir / f["path"] for f in old["files"]]
        return _result(r, "gguf", r.gguf_dir, f"tokenizer metadata rewritten in {len(changed)} file(s), tensors "
                       "unchanged", paths, {"tensor_types": old["facts"].get("tensor_types", {}),
                                            "metadata_only": True})
    from ..gguf import export_gguf

    g = r.recipe.gguf
    name = r.recipe.main_repo.split("/", 1)[1]
    with output_dir(r.gguf_dir, overwrite=True) as tmp:
        result = export_gguf(r.main_dir, tmp, g.quants, name, g.split_max_size, overwrite=True,
                             license=r.recipe.license, base_models=[r.recipe.main_repo],
                             quantized_by=r.recipe.author, pre_tokenizer=g.pre_tokenizer, model_card=False,
                             reporter=r.reporter)
    paths = [r.gguf_dir / p.name for ps in result.files.values() for p in ps]
    return _result(r, "gguf", r.gguf_dir, f"{len(paths)} GGUF file(s): {', '.join(result.files)}", paths,
                   {"tensor_types": result.tensor_types})


# -- awq ----------------------------------------------------------------------------------------------------------------
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
    return {"options": r.recipe.awq.model_dump(mode="json", exclude={"device"}),
            "calibration": r.manifest.hash(calib) if calib.is_file() else options.calibration,
            "model": _main_files(r, tokenizer=False), "code": code_versions(AWQ_CODE)}


def _awq_run(r: Release) -> StageResult:
    """A full AWQ run, or -- when only tokenizer files changed and the folder is intact -- the folder again with the
    main folder's tokenizer files and the quantized tensors hard-linked unchanged."""
    from ..awq.stage import SIDE_FILES

    old = r.manifest.stage("awq")
    if old and old["depends"]["weights"] == fingerprint(_awq_weights(r)) and \
            r.manifest.intact(r.awq_dir, old["files"]) is None:
        from ..tokenizer.output import _copy_into

        side = [n for n in SIDE_FILES if (r.main_dir / n).is_file()]
        with output_dir(r.awq_dir, overwrite=True) as tmp:
            _copy_into(r.awq_dir, tmp, {}, skip_weights=False, skip=set(SIDE_FILES), link=True)
            for name in side:
                shutil.copyfile(r.main_dir / name, tmp / name)
        kept = [f["path"] for f in old["files"] if f["path"] not in SIDE_FILES]   # not the cards stage's README
        paths = [r.awq_dir / p for p in sorted([*kept, *side])]
        return _result(r, "awq", r.awq_dir, f"tokenizer files updated ({', '.join(side)}), tensors unchanged",
                       paths, {**old["facts"], "metadata_only": True})
    from ..awq.stage import run_awq

    result = run_awq(_awq_options(r), r.main_dir, r.awq_dir, r.reporter, overwrite=True)
    return _result(r, "awq", r.awq_dir, result.summary, facts=result.facts)


# -- quality: PPL and KLD of every artefact against the main folder ----------------------------------------------------
def _artefacts(r: Release) -> list[Path]:
    """The first file of each GGUF type (a split set is read from its first shard) and the AWQ folder."""
    files = [r.gguf_dir / f["path"] for f in _files(r, "gguf")
             if "-of-" not in f["path"] or "-00001-of-" in f["path"]]
    return sorted(files) + ([r.awq_dir] if r.recipe.awq is not None else [])


def _quality_applies(r: Release) -> str | None:
    if r.recipe.quality is False:
        return "quality: false in the recipe"
    if len(r.repo_folders()) == 1:
        return "no quantized artefacts (no gguf: or awq: section, or left out)"
    return None


def _quality_depends(r: Release) -> dict:
    q = r.recipe.quality
    text = r.local(q.text) if q.text != "builtin" else None
    return {"options": q.model_dump(mode="json"), "text": r.manifest.hash(text) if text and text.is_file() else q.text,
            "artefacts": {stage: _files(r, stage) for stage in ("tokenizer", "gguf", "awq")}}


def _quality_run(r: Release) -> StageResult:
    from ..quality import QualityGateError, run_quality

    q = r.recipe.quality
    options = q if q.text == "builtin" else q.model_copy(update={"text": str(r.local(q.text))})
    try:
        result = run_quality(options, r.main_dir, _artefacts(r), r.quality_report, r.reporter)
    except QualityGateError as exc:
        raise GateError(f"quality gate: {exc}") from None
    return _result(r, "quality", r.work, result.summary, [r.quality_report], result.facts)


# -- cards --------------------------------------------------------------------------------------------------------------
def _card_depends(r: Release) -> dict:
    recipe = r.recipe.model_dump(mode="json", exclude={"merge", "gguf", "awq", "quality", "tokenizer", "publish"})
    template = r.local(r.recipe.card.template) if r.recipe.card.template else None
    return {"recipe": recipe, "template": template.read_text(encoding="utf-8") if template else None,
            "folders": {stage: _files(r, stage) for stage in ("tokenizer", "gguf", "awq", "quality")}}


def _card_run(r: Release) -> StageResult:
    from ..card import write_card

    template = r.local(r.recipe.card.template) if r.recipe.card.template else None
    quality = r.quality_report if r.manifest.stage("quality") and r.quality_report.is_file() else None
    written = [write_card(folder, folder / "README.md", r.recipe, template, overwrite=True, quality=quality).path
               for folder in r.repo_folders().values()]
    return StageResult("cards", r.work, r.manifest.describe(r.work, written),
                       f"{len(written)} card(s): " + ", ".join(str(p.relative_to(r.work)) for p in written))


# -- publish ------------------------------------------------------------------------------------------------------------
def _publish_options(r: Release):
    from ..publish.options import PublishOptions

    p = r.recipe.publish
    target = "hub" if r.push else (f"dir:{r.work / p.target[4:]}" if p.target.startswith("dir:") else p.target)
    notes = "\n".join(f"- {c}" for c in r.recipe.releases[0].changes) if r.recipe.releases else None
    fields = p.model_dump(exclude={"repos", "target"})
    fields.update(target=target, version=r.recipe.version, description=p.description or notes)
    return PublishOptions(**fields)


def _publish_depends(r: Release) -> dict:
    return {"options": r.recipe.publish.model_dump(mode="json"), "push": r.push, "version": r.recipe.version,
            "notes": [c for rel in r.recipe.releases[:1] for c in rel.changes],
            "artefacts": {stage: _files(r, stage) for stage in ("tokenizer", "gguf", "awq", "cards")}}


def _publish_root(r: Release) -> Path:
    options = _publish_options(r)
    return Path(options.target[4:]) if options.target.startswith("dir:") else r.work


def _publish_run(r: Release) -> StageResult:
    from ..publish import run_publish
    from .gate import check_release

    check_release(r)
    options = _publish_options(r)
    folders = r.repo_folders()
    result = run_publish(options, folders, r.reporter,
                         recorded={repo: r.manifest.recorded(folder) for repo, folder in folders.items()})
    if options.target == "hub":
        return StageResult("publish", r.work, [], result.summary, result.facts)
    root = _publish_root(r)
    files = [root / repo / f.path for repo in r.repo_folders() for f in r.manifest.describe(root / repo)]
    return StageResult("publish", root, r.manifest.describe(root, files), result.summary, result.facts)


def _publish_applies(r: Release) -> str | None:
    if r.recipe.publish.target == "hub" and not r.push:
        return "publish.target is hub: pass --push to upload"
    return None


def _needs(section: str) -> Callable[[Release], str | None]:
    return lambda r: None if getattr(r.recipe, section) is not None else f"the recipe has no {section}: section"


STEPS = [
    Step("merge", _needs("merge"), _merge_depends, lambda r: r.merged_dir, _merge_run,
         ("releaser.merge", "releaser.arch", "releaser.checkpoint", "torch", "safetensors", "peft")),
    Step("tokenizer", lambda r: None, _tokenizer_depends, lambda r: r.main_dir, _tokenizer_run,
         ("releaser.tokenizer", "releaser.checkpoint", "tokenizers", "transformers")),
    Step("verify", lambda r: None, _verify_depends, lambda r: r.main_dir, _verify_run,
         ("releaser.tokenizer", "transformers")),
    Step("gguf", _needs("gguf"), _quant_depends(_gguf_weights), lambda r: r.gguf_dir, _gguf_run, GGUF_CODE),
    Step("awq", _needs("awq"), _quant_depends(_awq_weights), lambda r: r.awq_dir, _awq_run, AWQ_CODE),
    Step("quality", _quality_applies, _quality_depends, lambda r: r.work, _quality_run,
         ("releaser.quality", "releaser.arch", "releaser.awq", "releaser.gguf", "torch", "transformers",
          "llama_cpp_python")),
    Step("cards", lambda r: None, _card_depends, lambda r: r.work, _card_run,
         ("releaser.card", "releaser.templates", "jinja2", "huggingface_hub")),
    Step("publish", _publish_applies, _publish_depends, _publish_root, _publish_run,
         ("releaser.publish", "huggingface_hub")),
]
NAMES = [s.name for s in STEPS]
