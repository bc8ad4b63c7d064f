"""4-bit AWQ (activation-aware weight quantization) written in AutoAWQ's GEMM checkpoint format."""

from .stage import AWQOptions, run_awq

__all__ = ["AWQOptions", "run_awq"]
