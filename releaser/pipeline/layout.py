"""The work folder's layout must not overlap: each repo folder, ``merged``, ``imatrix``, the ``dir:`` publish folder,
``release.json`` and ``quality.json`` is its own path, none inside another (the publish folder holds only its
mirrors). Checked by ``releaser check`` and before ``releaser release`` writes anything."""

from __future__ import annotations

import os
from pathlib import Path, PurePath

from ..errors import ConfigError
from ..recipe import Recipe
from .manifest import NAME as MANIFEST

QUALITY = "quality.json"
MERGED = "merged"
IMATRIX = "imatrix"


def outputs(recipe: Recipe, work: Path) -> list[tuple[str, Path]]:
    """(what, path) of everything a release writes in or for ``work``; the recipe key that sets it comes first."""
    paths = [("name" if not recipe.publish.repos.main else "publish.repos.main",
              work / recipe.main_repo.split("/", 1)[1])]
    quants = recipe.quants
    suffix = {"gguf": "-GGUF", "awq": "-AWQ", "w4a16": "-W4A16", "mlx": "-MLX-...bit"}
    for section in ("gguf", "awq", "w4a16", "mlx"):
        repo = getattr(quants, section)
        if repo:
            own = getattr(recipe.publish.repos, section)
            key = f"publish.repos.{section}" if own else f"name (+ {suffix[section]})"
            paths.append((key, work / repo.split("/", 1)[1]))
    if recipe.awq is not None and quants.awq is None:   # AutoAWQ not released: its folder is the W4A16's source
        paths.append(("the AWQ folder (name + -AWQ)", work / f"{recipe.main_repo}-AWQ".split("/", 1)[1]))
    if recipe.merge is not None:
        paths.append((f"the merge's output {MERGED}", work / MERGED))
    if recipe.gguf is not None and recipe.gguf.imatrix == "auto":
        paths.append((f"the importance matrix folder {IMATRIX}", work / IMATRIX))
    paths.append((f"the manifest {MANIFEST}", work / MANIFEST))
    if recipe.quality is not False:
        paths.append((f"the quality report {QUALITY}", work / QUALITY))
    target = recipe.publish.target
    if target.startswith("dir:"):
        paths.append((f"publish.target {target}", Path(os.path.normpath(work / Path(target[4:]).expanduser()))))
    return paths


def _key(path: Path) -> PurePath:
    """Compared without case: on macOS and Windows file systems ``Tiny`` and ``tiny`` are one folder."""
    return PurePath(os.path.normpath(path).casefold())


def check_layout(recipe: Recipe, work: Path) -> None:
    """Raise ConfigError naming the first two outputs that share a path (or one inside the other)."""
    entries = outputs(recipe, work)
    if recipe.publish.target.startswith("dir:"):
        root = _key(entries[-1][1])
        if root == _key(work) or root in _key(work).parents:
            raise ConfigError(f"publish.target {recipe.publish.target} is the work folder or a folder above it, so its "
                              "mirrors would land among the release's own files; use a folder of its own, e.g. "
                              "dir:published")
    for i, (what, path) in enumerate(entries):
        for other, other_path in entries[i + 1:]:
            a, b = _key(path), _key(other_path)
            if a == b or a in b.parents or b in a.parents:
                where = "the same path" if a == b else "paths one inside the other"
                shown = os.path.relpath(path, work)
                raise ConfigError(f"{what} and {other} are {where} in the work folder ({shown}); give the repos "
                                  "different names (publish.repos) or the publish target a folder of its own")
