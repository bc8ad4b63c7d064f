"""Kept for old imports: the architecture descriptions live in ``releaser.arch``."""

from ..arch import Architecture, architecture_for, supported_names  # noqa: F401
