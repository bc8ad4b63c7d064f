"""The ``imatrix`` stage: ``run(options, inputs, out, reporter) -> StageResult`` writes ``NAME-imatrix.gguf`` (the
importance matrix of the model folder ``inputs``, see compute.py) into the folder ``out``."""

from __future__ import annotations

import os
from pathlib import Path

from ..atomic import output_files
from ..stage import Reporter, StageResult, describe_files
from .compute import compute_imatrix
from .file import write
from .options import ImatrixOptions


def file_name(name: str) -> str:
    return f"{name}-imatrix.gguf"


def run(options: ImatrixOptions, inputs: str | os.PathLike, out: str | os.PathLike, reporter: Reporter | None = None,
        *, name: str | None = None, overwrite: bool = False, describe=describe_files, run_tasks=None,
        units: str | os.PathLike | None = None) -> StageResult:
    """Compute the importance matrix of the model folder ``inputs`` and write it as ``out/NAME-imatrix.gguf`` (NAME:
    ``name``, default the folder's name); other files in ``out`` are left alone. The facts name the calibration
    text and its sha256 (for the manifest and the card). ``run_tasks`` (:mod:`releaser.tasks`; an executor: Ray):
    one task per batch of chunks, on any node, each writing its sums into a hidden folder of the output's staging
    folder (or in ``units``, a release's folder for the units of this stage, where they are kept: a killed run's
    finished batches are taken, not run again); without it the batches run in this process. The bytes are the same."""
    inputs, out = Path(inputs), Path(out)
    target = file_name(name or inputs.name)
    with output_files(out, overwrite=overwrite) as tmp:   # held (locked) from the start: a second run fails at once
        result = compute_imatrix(options, inputs, reporter, run_tasks=run_tasks,
                                 parts=units if units is not None else tmp / ".parts", keep=units is not None)
        write(result.imatrix, tmp / target)
    summary = (f"imatrix of {inputs.name}: {len(result.imatrix.entries)} matrices, {result.chunks} chunks x "
               f"{options.ctx} tokens of {result.text.name} (sha256 {result.text.sha256[:12]}), "
               f"{result.seconds:.0f} s -> {out / target}")
    return StageResult("imatrix", out, describe(out, [out / target]), summary,
                       {**result.facts, "file": target, "seconds": round(result.seconds, 1)})
