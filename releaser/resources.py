"""Files shipped inside the package: the card and chat templates (the project's top-level ``templates/`` folder,
installed as the ``releaser.templates`` package so a wheel install has them)."""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from pathlib import Path


@cache
def templates_dir() -> Path:
    return Path(str(files("releaser.templates")))
