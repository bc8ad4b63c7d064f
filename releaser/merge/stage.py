"""The ``merge`` stage: ``run(options, inputs, out, reporter) -> StageResult`` around :func:`run_merge`."""

from __future__ import annotations

import os
from pathlib import Path

from ..stage import Reporter, StageResult, describe_files
from .options import MergeOptions


def run(options: MergeOptions, inputs: str | os.PathLike, out: str | os.PathLike, reporter: Reporter | None = None,
        *, strict: bool = False, overwrite: bool = False, describe=describe_files) -> StageResult:
    """Merge the models of ``options``' mergekit config into ``out``. ``inputs``: the folder a ``config:`` file and an
    inline config's relative model paths are taken from (the recipe's). ``strict``: every warning is an error."""
    from ..checkpoint import parse_size
    from .engine import run_merge

    config, base_dir = options.source(inputs)
    out = Path(out)
    result = run_merge(config, out, device=options.device, overwrite=overwrite,
                       max_shard_bytes=parse_size(options.shard_size), reporter=reporter, base_dir=base_dir,
                       strict=strict)
    return StageResult("merge", out, describe(out), f"merged {result.tensors} tensors with {result.method}")
