"""The ``gguf`` stage: ``run(options, inputs, out, reporter) -> StageResult`` around :func:`export_gguf`."""

from __future__ import annotations

import os
from pathlib import Path

from ..atomic import output_dir
from ..reflink import copy_file
from ..stage import Reporter, StageResult, describe_files
from .options import GGUFOptions


def imatrix_name(name: str) -> str:
    """The importance matrix's file in the GGUF repo (not ``.gguf``: runtimes and cards list those as models)."""
    return f"{name}.imatrix"


def run(options: GGUFOptions, inputs: str | os.PathLike, out: str | os.PathLike, reporter: Reporter | None = None,
        *, name: str, license: str | None = None, base_models: list[str] | None = None, tags: list[str] | None = None,
        languages: list[str] | None = None,
        quantized_by: str | None = None, kept: StageResult | None = None, overwrite: bool = False,
        imatrix: str | os.PathLike | None = None, describe=describe_files, run_tasks=None,
        units: str | os.PathLike | None = None) -> StageResult:
    """The GGUF files ``{name}-{TYPE}.gguf`` of the model folder ``inputs`` in ``out`` (no README: the cards stage
    writes it). ``kept``: an earlier run's result whose tensors are still right (same weights and options, files
    intact): only each file's tokenizer metadata is rewritten from ``inputs``, the tensor bytes are copied unchanged
    (a tokenizer fix is not requantized). ``imatrix``: the file to read ``options.imatrix`` from (a release resolves
    it from the recipe's folder; the GGUF records ``options.imatrix`` as written, so the bytes do not depend on where
    the recipe lies). ``run_tasks`` (:mod:`releaser.tasks`): run one task per type through it (an executor: Ray);
    without it every type is made in one pass over the checkpoint, in this process. The bytes are the same.
    ``units``: a folder for the units' files and results (a release's, keyed by the stage's fingerprint): the types
    a killed run finished there are taken, not made again."""
    out = Path(out)
    if kept is not None:
        from .fix import sync_tokenizer

        changed = []
        for f in kept.files:
            path = out / f.path
            if path.suffix != ".gguf" or ("-of-" in path.name and "-00001-of-" not in path.name):
                continue   # metadata lives in the first file of a split set; the imatrix has none
            if sync_tokenizer(path, Path(inputs)).changes:
                changed.append(path.name)
        paths = [out / f.path for f in kept.files]
        return StageResult("gguf", out, describe(out, paths), f"tokenizer metadata rewritten in {len(changed)} file(s),"
                           " tensors unchanged", {"tensor_types": kept.facts.get("tensor_types", {}),
                                                  "metadata_only": True,
                                                  **({"imatrix": kept.facts["imatrix"]} if "imatrix" in kept.facts
                                                     else {})})
    from ..atomic import remove
    from ..tasks import Resources, Task, run_local, take_kept

    reporter = reporter or Reporter()
    if options.imatrix == "auto" and imatrix is None:
        from ..errors import ConfigError

        raise ConfigError("gguf.imatrix auto is computed by a release; for one export run releaser imatrix first "
                          "and pass its file")
    source = Path(imatrix if imatrix is not None else options.imatrix) if options.imatrix is not None else None
    specs = options.specs()
    common = {"name": name, "license": license, "base_models": base_models, "tags": tags, "languages": languages,
              "quantized_by": quantized_by, "imatrix": str(source) if source is not None else None}
    with output_dir(out, overwrite=overwrite) as tmp:   # held (locked) from the start: a second run fails at once
        # each unit's own folder on the work folder's file system: in ``units`` (kept if the run is killed) or in
        # the output's temporary folder (gone with it)
        parts = Path(units) if units is not None else tmp / ".parts"

        def task(group: list) -> Task:
            label = "+".join(s.name for s in group)
            keep = parts / label
            return Task(label, "releaser.gguf.stage:export_types", (options, str(inputs), str(keep / "out"), group),
                        common, resources(inputs, group) if run_tasks is not None else Resources(),
                        str(keep) if units is not None else None)

        if run_tasks is not None:   # an executor: one task per type, on any node, each with what it needs
            done = run_tasks([task([spec]) for spec in specs])
        else:                       # in this process: the types left in one pass over the checkpoint
            found = take_kept([task([spec]) for spec in specs], reporter)   # the types a killed run made
            done = list(found.values())
            if left := [spec for i, spec in enumerate(specs) if i not in found]:
                done += run_local([task(left)], reporter)
        made = {q: files for d in done for q, files in d.value["files"].items()}
        for d in done:
            for files in d.value["files"].values():
                for file in files:
                    os.replace(parts / d.label / "out" / file, tmp / file)
        if units is None:
            remove(parts)
        if source is not None:   # published beside the files it made, as the popular uploaders do
            copy_file(source, tmp / imatrix_name(name))
    order = [s.name for s in specs]   # files and facts in the recipe's order, whichever unit made a type
    paths = [out / f for q in order for f in made[q]]
    if source is not None:
        paths.append(out / imatrix_name(name))
    types = {q: t for d in done for q, t in d.value["tensor_types"].items()}
    facts = {"tensor_types": {q: types[q] for q in order}}
    imatrix_keys = next((d.value["imatrix"] for d in done if d.value["imatrix"]), None)
    if imatrix_keys:
        facts["imatrix"] = imatrix_keys
    searches = {q: s for d in done for q, s in d.value["search"].items()}
    if searches:
        facts["search"] = {q: searches[q] for q in order if q in searches}
    return StageResult("gguf", out, describe(out, paths), f"{len(paths)} GGUF file(s): {', '.join(order)}", facts)


def export_types(options: GGUFOptions, inputs: str, part: str, specs: list, *, name: str, license: str | None,
                 base_models: list[str] | None, tags: list[str] | None, languages: list[str] | None,
                 quantized_by: str | None, imatrix: str | None, reporter: Reporter | None = None) -> dict:
    """One unit of the gguf stage: the files of ``specs`` (a recipe's target searched first) in the new folder
    ``part``, written atomically (a unit run again, after its node died, replaces it with the same bytes). Returns
    the file names and facts of each type."""
    from .export import export_gguf
    from .imatrix_weights import load_imatrix

    reporter = reporter or Reporter()
    im = None
    if imatrix is not None:
        source = Path(imatrix)
        im = load_imatrix(source)   # recorded as written in the recipe (auto: the file's name), not where it lies
        im = im.__class__(source.name if options.imatrix == "auto" else options.imatrix, im.weights, im.datasets,
                          im.chunk_count)
    specs, searches = list(specs), {}
    for i, spec in enumerate(specs):
        if spec.searched:   # the options checked there is an imatrix
            from .search import search_recipe

            found = search_recipe(inputs, spec, im, reporter)
            specs[i], searches[spec.name] = found.spec, found.facts()
            reporter.message(f"{spec.name}: {found.bits_per_weight:.2f} bpw, predicted mean KLD "
                             f"{found.predicted_kld:.4f} ({found.seconds:.0f} s search)")
    with output_dir(part, overwrite=True) as tmp:
        result = export_gguf(inputs, tmp, specs, name, options.split_max_size, overwrite=True,
                             license=license, tags=tags, languages=languages, base_models=base_models,
                             quantized_by=quantized_by,
                             pre_tokenizer=options.pre_tokenizer, model_card=False, imatrix=im, reporter=reporter)
    return {"files": {q: [p.name for p in ps] for q, ps in result.files.items()},
            "tensor_types": result.tensor_types, "imatrix": result.imatrix, "search": searches}


def resources(inputs: str | os.PathLike, specs: list):
    """A unit's CPU and memory (from the tensor shapes): the process, the export's read-ahead budget, the largest
    tensor in float32 and its quantized copies; a searched recipe also runs the model (all of it in float32)."""
    from ..tasks import PROCESS_BYTES, Resources
    from ..tasks import float_bytes
    from .export import AHEAD_BYTES

    total, largest = float_bytes(inputs)
    memory = PROCESS_BYTES + AHEAD_BYTES + largest * (1 + len(specs))
    if any(s.searched for s in specs):
        memory += total
    return Resources(cpus=1, memory=memory)
