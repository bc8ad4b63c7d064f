"""The exceptions releaser raises for bad input; the CLI prints them as one line (``error: ...``) and exits non-zero."""

from __future__ import annotations


class ReleaserError(Exception):
    """Base class: the message names the problem and, where there is one, the fix."""

    exit_code = 2


class ConfigError(ReleaserError):
    """A recipe or merge config is invalid (the message names the YAML path of the bad field)."""


class ModelError(ReleaserError):
    """An input model folder is missing, unreadable, incompatible or of an unsupported architecture."""


class OutputError(ReleaserError):
    """The output cannot be written (exists without --overwrite, not writable, disk full)."""


class GateError(ConfigError):
    """The release failed a check; nothing was published."""
