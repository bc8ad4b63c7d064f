"""The ``verify`` stage: ``run(options, inputs, out, reporter) -> StageResult``, the doctor (with the stop test) on
the main folder; a finding of error severity stops the release."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import GateError
from ..stage import Reporter, StageResult, describe_files
from .options import TokenizerOptions


def run(options: TokenizerOptions | None, inputs: str | os.PathLike, out: str | os.PathLike | None = None,
        reporter: Reporter | None = None, *, describe=describe_files) -> StageResult:
    """Diagnose the model folder ``inputs`` against ``options.template`` (None: its own template); a GateError lists
    the errors. Nothing is written (``out``: the folder the result stands for, default ``inputs``)."""
    from .doctor import diagnose

    report = diagnose(inputs, options.template if options is not None else None)
    if not report.clean:
        problems = "; ".join(f"{f.problem} ({f.fix})" for f in report.findings if f.severity == "error")
        raise GateError(f"{inputs} fails the doctor: {problems}")
    return StageResult("verify", Path(out if out is not None else inputs), [], f"doctor clean: turns end with "
                       f"{report.end_of_turn}, generation eos ids {report.generation_eos}",
                       {"doctor": report.to_dict()})
