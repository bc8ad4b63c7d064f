"""Options of the publish stage (the recipe's ``publish:`` section and the flags of ``releaser publish``)."""

from __future__ import annotations

from pydantic import Field, field_validator

from ..errors import ReleaserError
from ..options import check_repo_id
from ..stage import StageOptions

__all__ = ["PublishError", "PublishOptions", "PublishSection", "Repos"]


class PublishError(ReleaserError):
    """Publishing failed: no or a rejected token, the Hub refused a change, or retries ran out."""


class Repos(StageOptions):
    """Hub repo ids of the release (defaults: NAME, NAME-GGUF, NAME-AWQ, NAME-W4A16, NAME-MLX-4bit)."""

    main: str | None = None
    gguf: str | None = None
    awq: str | None = None
    w4a16: str | None = None
    mlx: str | None = None

    _ids = field_validator("main", "gguf", "awq", "w4a16", "mlx")(check_repo_id)


class PublishOptions(StageOptions):
    target: str = Field("hub", description="Where to publish: hub, or dir:PATH (local folders PATH/OWNER/NAME that "
                                           "mirror the repos).")
    private: bool = Field(False, description="Create missing Hub repos as private (existing repos keep theirs).")
    dry_run: bool = Field(False, description="Plan and show the changes; send and write nothing.")
    create_pr: bool = Field(False, description="Open a pull request per changed repo instead of committing to main.")
    message: str | None = Field(None, description="Commit title (default: 'Release VERSION' or 'Update files').")
    description: str | None = Field(None, description="Commit description (default: the release notes / the plan).")
    keep_stale: bool = Field(False, description="Keep remote files that are no longer in the release folders.")
    include_untracked: bool = Field(False, description="In a release's work folder, also send files no release stage "
                                                       "wrote (default: listed and left out).")
    version: str | None = Field(None, description="Release version; each updated repo is tagged with it.")
    tag: str | None = Field(None, description="Tag name (default: v + version).")
    collection: str | None = Field(None, description="Hub collection (title, in the main repo's namespace) to add "
                                                     "the release's repos to; created if missing.")
    retries: int = Field(5, ge=1, le=20, description="Attempts per commit before giving up.")
    max_wait: float = Field(120.0, gt=0, le=3600, description="Longest wait between attempts, in seconds; a "
                                                              "Retry-After above it ends the run with its wait.")

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        if value != "hub" and not (value.startswith("dir:") and len(value) > 4):
            raise ValueError(f"target must be 'hub' or 'dir:PATH', not {value!r}")
        return value

    @property
    def tag_name(self) -> str | None:
        if self.tag:
            return self.tag
        if self.version:
            return self.version if self.version.startswith("v") else f"v{self.version}"
        return None

    @property
    def commit_title(self) -> str:
        if self.message:
            return self.message
        return f"Release {self.tag_name}" if self.tag_name else "Update files"


class PublishSection(PublishOptions):
    """The recipe's ``publish:``: the publish options (default target: local mirror folders under the work folder)
    and the repo ids."""

    target: str = Field("dir:published", description="dir:PATH (relative to the work folder) or hub.")
    repos: Repos = Field(default_factory=Repos)
