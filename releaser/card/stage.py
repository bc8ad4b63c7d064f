"""The ``cards`` stage: ``run(options, inputs, out, reporter) -> StageResult``, a README.md in every repo folder."""

from __future__ import annotations

import os
from pathlib import Path

from ..recipe import Recipe
from ..stage import Reporter, StageResult, describe_files


def run(options: Recipe, inputs: list[str | os.PathLike], out: str | os.PathLike, reporter: Reporter | None = None,
        *, template: str | os.PathLike | None = None, quality: str | os.PathLike | None = None,
        overwrite: bool = False, describe=describe_files) -> StageResult:
    """Write ``README.md`` into each repo folder of ``inputs`` (main repo first), rendered from the folder and the
    recipe ``options`` (a card tells the whole release: name, license, sections, ...) with ``template`` (default:
    the built-in one) and the quality report ``quality``. ``out``: the folder holding the repo folders."""
    from .render import write_card

    out = Path(out)
    written = [write_card(folder, Path(folder) / "README.md", options, template, overwrite=overwrite,
                          quality=quality).path for folder in inputs]
    return StageResult("cards", out, describe(out, written),
                       f"{len(written)} card(s): " + ", ".join(str(p.relative_to(out)) for p in written))
