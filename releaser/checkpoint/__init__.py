"""Checkpoint I/O: lazy reading and streaming, atomic, sharded writing of Hugging Face model folders."""

from .arch import Architecture, architecture_for
from .config import read_config
from .reader import CheckpointReader
from .writer import CheckpointWriter, parse_size

__all__ = ["Architecture", "CheckpointReader", "CheckpointWriter", "architecture_for", "parse_size", "read_config"]
