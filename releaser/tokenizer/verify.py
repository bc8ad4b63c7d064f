"""The ``verify`` stage: ``run(options, inputs, out, reporter) -> StageResult``, the doctor (with the stop test) on
the main folder, then the stop audit (:mod:`.audit`: sampled answers from the model, how each ends); a finding of
error severity or a failed audit stops the release."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import GateError
from ..stage import Reporter, StageResult, describe_files
from .options import StopAuditOptions, TokenizerOptions


def run(options: TokenizerOptions | None, inputs: str | os.PathLike, out: str | os.PathLike | None = None,
        reporter: Reporter | None = None, *, audit: StopAuditOptions | None = None,
        describe=describe_files) -> StageResult:
    """Diagnose the model folder ``inputs`` against ``options.template`` (None: its own template), then run the stop
    audit ``audit`` (None: none); a GateError lists the errors. Nothing is written (``out``: the folder the result
    stands for, default ``inputs``)."""
    from .doctor import diagnose

    report = diagnose(inputs, options.template if options is not None else None)
    if not report.clean:
        problems = "; ".join(f"{f.problem} ({f.fix})" for f in report.findings if f.severity == "error")
        raise GateError(f"{inputs} fails the doctor: {problems}")
    facts = {"doctor": report.to_dict()}
    summary = f"doctor clean: turns end with {report.end_of_turn}, generation eos ids {report.generation_eos}"
    if audit is not None:
        from .audit import stop_audit

        if reporter is not None:
            reporter.message(f"stop audit: sampling {audit.samples} chat answers of up to {audit.max_tokens} tokens")
        result = stop_audit(inputs, audit)
        if problems := result.problems(Path(inputs).name):
            raise GateError(f"{inputs} fails the stop audit: {'; '.join(problems)}")
        facts["stop_audit"] = result.to_dict()
        counts = ", ".join(f"{t} {n}" for t, n in result.counts.items()) or "none"
        summary += (f"; stop audit: {result.ended} of {result.answers} answers end ({counts}) in "
                    f"{result.seconds:.0f} s")
    return StageResult("verify", Path(out if out is not None else inputs), [], summary, facts)
