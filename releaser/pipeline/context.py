"""What the stages of one release share: the recipe, the work folder and its layout, the manifest, the reporter."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelError
from ..recipe import Recipe
from ..stage import Reporter
from .executor import LocalExecutor
from .manifest import Manifest


@dataclass
class Release:
    recipe: Recipe
    recipe_path: Path
    work: Path
    manifest: Manifest
    reporter: Reporter
    push: bool = False
    left_out: frozenset[str] = frozenset()   # stages this run leaves out (--only, --skip)
    strict: bool = False                     # every warning is an error (--strict)
    warnings: list[str] = field(default_factory=list)   # what the checks before the first stage found
    family: str = ""                         # the model family, once the checks have read a config.json
    executor: LocalExecutor = field(default_factory=LocalExecutor)   # where the stages' tasks run (local, ray)

    @property
    def recipe_dir(self) -> Path:
        return self.recipe_path.parent

    def local(self, ref: str) -> Path:
        """A path written in the recipe, relative to the recipe's folder."""
        path = Path(ref).expanduser()
        return path if path.is_absolute() else (self.recipe_dir / path)

    def template(self) -> str | None:
        """The chat template the recipe asks for: a built-in name, or the path of its file (None: no tokenizer:)."""
        t = self.recipe.tokenizer
        if t is None:
            return None
        is_file = t.template.endswith((".jinja", ".j2")) or "/" in t.template
        return str(self.local(t.template)) if is_file else t.template

    def merge_config(self) -> tuple[dict | Path, Path | None]:
        """The merge config and the folder its relative model paths are taken from (a config file's own folder)."""
        return self.recipe.merge.source(self.recipe_dir)

    # the work folder: merged/ (the merge's raw output) and one folder per Hub repo, named as the repo
    @property
    def merged_dir(self) -> Path:
        return self.work / "merged"

    @property
    def main_dir(self) -> Path:
        return self.work / self.recipe.main_repo.split("/", 1)[1]

    @property
    def gguf_dir(self) -> Path:
        return self.work / self.recipe.quants.gguf.split("/", 1)[1]

    @property
    def awq_dir(self) -> Path:
        """The AWQ folder: the -AWQ repo's, or (AutoAWQ not released, only other formats of it) NAME-AWQ all the
        same, the W4A16 folder's source."""
        return self.work / (self.recipe.quants.awq or f"{self.recipe.main_repo}-AWQ").split("/", 1)[1]

    @property
    def w4a16_dir(self) -> Path:
        return self.work / self.recipe.quants.w4a16.split("/", 1)[1]

    @property
    def mlx_dir(self) -> Path:
        return self.work / self.recipe.quants.mlx.split("/", 1)[1]

    @property
    def imatrix_dir(self) -> Path:
        return self.work / "imatrix"

    @property
    def quality_report(self) -> Path:
        return self.work / "quality.json"

    def source_dir(self) -> Path:
        """The model the release is made of: the merge's output, or the recipe's ``model:`` folder."""
        return self.merged_dir if self.recipe.merge is not None else self.local(self.recipe.model)

    def repo_folders(self) -> dict[str, Path]:
        """Repo id -> folder, main repo first (the quant cards link to it)."""
        repos = {self.recipe.main_repo: self.main_dir}
        if self.recipe.gguf is not None and self._made("gguf"):
            repos[self.recipe.quants.gguf] = self.gguf_dir
        quants = self.recipe.quants
        if quants.awq is not None and self._made("awq"):
            repos[quants.awq] = self.awq_dir
        awq = self._made("awq")   # W4A16, and MLX from the AWQ codes, are made of the AWQ folder
        if quants.w4a16 is not None and self._made("w4a16") and awq:
            repos[quants.w4a16] = self.w4a16_dir
        if quants.mlx is not None and self._made("mlx") and (awq or self.recipe.mlx_source != "awq"):
            repos[quants.mlx] = self.mlx_dir
        return repos

    def _made(self, stage: str) -> bool:
        """A quant stage's folder belongs to the release unless this run leaves the stage out and no run made it."""
        return stage not in self.left_out or self.manifest.stage(stage) is not None


def require_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} does not exist; check the path in the recipe")
