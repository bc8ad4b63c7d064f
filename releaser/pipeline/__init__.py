"""The one-command release: every stage of a recipe, a manifest (``release.json``), resume and a gate."""

from .run import CheckResult, ReleaseResult, StageOutcome, check_recipe, run_release
from .stages import GateError

__all__ = ["CheckResult", "GateError", "ReleaseResult", "StageOutcome", "check_recipe", "run_release"]
