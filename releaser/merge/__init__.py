"""Merging: mergekit-compatible configs, a streaming engine, and one module per merge method family.

``run_merge`` and ``MergeResult`` are loaded on first use, so that parsing a config does not import torch."""

from .config import MergeConfig, parse_config

__all__ = ["MergeConfig", "MergeResult", "dry_run", "parse_config", "run_merge"]


def __getattr__(name: str):
    if name in ("MergeResult", "run_merge"):
        from . import engine

        return getattr(engine, name)
    if name == "dry_run":
        from .describe import dry_run

        return dry_run
    raise AttributeError(name)
