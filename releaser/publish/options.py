"""Options of the publish stage (the recipe's ``publish:`` section and the flags of ``releaser publish``)."""

from __future__ import annotations

from ..errors import ReleaserError
from ..options import PublishOptions

__all__ = ["PublishError", "PublishOptions"]


class PublishError(ReleaserError):
    """Publishing failed: no or a rejected token, the Hub refused a change, or retries ran out."""
