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
        imatrix: str | os.PathLike | None = None, describe=describe_files) -> StageResult:
    """The GGUF files ``{name}-{TYPE}.gguf`` of the model folder ``inputs`` in ``out`` (no README: the cards stage
    writes it). ``kept``: an earlier run's result whose tensors are still right (same weights and options, files
    intact): only each file's tokenizer metadata is rewritten from ``inputs``, the tensor bytes are copied unchanged
    (a tokenizer fix is not requantized). ``imatrix``: the file to read ``options.imatrix`` from (a release resolves
    it from the recipe's folder; the GGUF records ``options.imatrix`` as written, so the bytes do not depend on where
    the recipe lies)."""
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
    from .export import export_gguf
    from .imatrix_weights import load_imatrix

    im = None
    if options.imatrix is not None:
        if options.imatrix == "auto" and imatrix is None:
            from ..errors import ConfigError

            raise ConfigError("gguf.imatrix auto is computed by a release; for one export run releaser imatrix first "
                              "and pass its file")
        source = Path(imatrix if imatrix is not None else options.imatrix)
        im = load_imatrix(source)   # recorded as written in the recipe (auto: the file's name), not where it lies
        im = im.__class__(source.name if options.imatrix == "auto" else options.imatrix, im.weights, im.datasets,
                          im.chunk_count)
    reporter = reporter or Reporter()
    specs, searches = options.specs(), {}
    for i, spec in enumerate(specs):
        if spec.searched:   # the options checked there is an imatrix
            from .search import search_recipe

            found = search_recipe(inputs, spec, im, reporter)
            specs[i], searches[spec.name] = found.spec, found.facts()
            reporter.message(f"{spec.name}: {found.bits_per_weight:.2f} bpw, predicted mean KLD "
                             f"{found.predicted_kld:.4f} ({found.seconds:.0f} s search)")
    with output_dir(out, overwrite=overwrite) as tmp:
        result = export_gguf(inputs, tmp, specs, name, options.split_max_size, overwrite=True,
                             license=license, tags=tags, languages=languages, base_models=base_models,
                             quantized_by=quantized_by,
                             pre_tokenizer=options.pre_tokenizer, model_card=False, imatrix=im, reporter=reporter)
        if im is not None:   # published beside the files it made, as the popular uploaders do
            copy_file(source, tmp / imatrix_name(name))
    paths = [out / p.name for ps in result.files.values() for p in ps]
    if im is not None:
        paths.append(out / imatrix_name(name))
    facts = {"tensor_types": result.tensor_types}
    if result.imatrix:
        facts["imatrix"] = result.imatrix
    if searches:
        facts["search"] = searches
    return StageResult("gguf", out, describe(out, paths), f"{len(paths)} GGUF file(s): {', '.join(result.files)}",
                       facts)
