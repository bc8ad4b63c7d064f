"""A finding of the tokenizer doctor: one problem, the evidence for it, and the fix."""

from __future__ import annotations

from dataclasses import asdict, dataclass

ERROR = "error"      # generation will not stop where it should, or the model folder is inconsistent
WARNING = "warning"  # harmless for inference, worth fixing before training or release (e.g. pad == eos)


@dataclass(frozen=True)
class Finding:
    code: str        # stable identifier, e.g. "eos-mismatch"
    problem: str
    evidence: str
    fix: str
    severity: str = ERROR

    def to_dict(self) -> dict:
        return asdict(self)


def has_errors(findings: list[Finding]) -> bool:
    return any(f.severity == ERROR for f in findings)
