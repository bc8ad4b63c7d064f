"""4-bit AWQ (activation-aware weight quantization) written in AutoAWQ's GEMM checkpoint format."""

from __future__ import annotations

from .options import AWQOptions


def run_awq(*args, **kwargs):
    """See :func:`releaser.awq.stage.run_awq` (imported on first use: it needs torch)."""
    from .stage import run_awq as run

    return run(*args, **kwargs)


__all__ = ["AWQOptions", "run_awq"]
