"""The one-command release: every stage of a recipe, a manifest (``release.json``), resume and a gate."""

from ..errors import GateError
from .run import CheckResult, ReleaseResult, StageOutcome, check_recipe, run_release

__all__ = ["CheckResult", "GateError", "ReleaseResult", "StageOutcome", "check_recipe", "run_release"]
