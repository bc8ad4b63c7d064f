"""Terminal output of ``releaser doctor`` and ``releaser fix-tokenizer`` (the CLI stays a thin wrapper)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..tokenizer.doctor import DoctorReport, diagnose
from ..tokenizer.findings import Finding
from ..tokenizer.fix import FixReport, FixSpec, fix_tokenizer

STYLE = {"error": "bold red", "warning": "yellow"}


def findings_table(findings: list[Finding], title: str) -> Table:
    table = Table(title=title, show_lines=True, title_justify="left")
    for col in ("severity", "problem", "evidence", "proposed fix"):
        table.add_column(col, overflow="fold")
    for f in findings:
        table.add_row(f"[{STYLE.get(f.severity, '')}]{f.severity}[/]", f.problem, f.evidence, f.fix)
    return table


def run_doctor(model_dir: Path, template: str | None, as_json: bool, out: Console) -> int:
    """Print the doctor's findings; the exit code is 1 when there is an error-level finding."""
    report: DoctorReport = diagnose(model_dir, template, runtimes=True)
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
    else:
        against = f" (checked against {report.template})" if report.template else ""
        if report.findings:
            out.print(findings_table(report.findings, f"{report.model_dir}{against}"))
        errors = sum(f.severity == "error" for f in report.findings)
        warnings = len(report.findings) - errors
        if report.findings:
            out.print(f"to fix: releaser fix-tokenizer {model_dir} --template {report.template or 'NAME'} "
                      "(-o OUT_DIR | --in-place)", highlight=False, markup=False)
        _print_family(model_dir, out)
        verdict = "[green]clean[/]" if report.clean else "[bold red]problems found[/]"
        out.print(f"{verdict}: {errors} error(s), {warnings} warning(s); eos {report.eos_token!r}, "
                  f"turns end with {report.end_of_turn}, generation eos ids {report.generation_eos}; llama.cpp's "
                  f"built-in template: {report.llama_cpp or 'not checked'}", highlight=False)
    return 0 if report.clean else 1


def _print_family(model_dir: Path, out: Console) -> None:
    from ..arch import stage_summary
    from ..checkpoint.config import read_config
    from ..errors import ModelError

    try:
        config = read_config(model_dir)
    except ModelError:
        return
    out.print(stage_summary(config), highlight=False, markup=False)


def run_fix(model_dir: Path, spec: FixSpec, out: Console) -> FixReport:
    report = fix_tokenizer(model_dir, spec)
    if not report.changes:
        out.print(f"[green]nothing to change[/]: {model_dir} already matches {report.template}", highlight=False)
    for name, lines in report.changes.items():
        out.print(f"[bold]{name}[/]", highlight=False)
        for line in lines:
            out.print(f"  {line}", highlight=False, markup=False)
    if report.remaining:
        out.print(findings_table(report.remaining, "still to check after the fix"))
    out.print(f"[green]fixed[/] ({report.template}; eos {report.eos_token!r}, stop ids {report.eos_ids}, "
              f"pad {report.pad_token!r}; stop strings {report.stop_strings}; {len(report.changes)} file(s) changed) "
              f"-> {report.out_dir}", highlight=False)
    return report
