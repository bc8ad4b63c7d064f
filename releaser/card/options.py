"""The cards stage's options: the recipe section ``card:``."""

from __future__ import annotations

from pydantic import Field

from ..stage import StageOptions


class Section(StageOptions):
    """A section of the user's own, rendered as ``## title`` followed by ``body`` (Markdown)."""

    title: str = Field(min_length=1)
    body: str = Field(min_length=1)


class CardOptions(StageOptions):
    """``card:`` -- what the model cards say beyond the facts read from the files."""

    title: str | None = Field(None, description="Card title (default: the repo name).")
    sections: list[Section] = Field(default_factory=list, description="Your own sections, after Usage.")
    template: str | None = Field(None, description="Your own Jinja2 card template (relative to the recipe).")
