"""Merging: mergekit-compatible configs, a streaming engine, and one module per merge method family."""

from .config import MergeConfig, parse_config
from .describe import dry_run
from .engine import MergeResult, run_merge

__all__ = ["MergeConfig", "MergeResult", "dry_run", "parse_config", "run_merge"]
