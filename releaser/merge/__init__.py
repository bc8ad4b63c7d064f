"""Merging: mergekit-compatible configs, a streaming engine, and one module per merge method family."""

from .config import MergeConfig, parse_config
from .engine import MergeResult, run_merge

__all__ = ["MergeConfig", "MergeResult", "parse_config", "run_merge"]
