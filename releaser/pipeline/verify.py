"""``releaser verify WORK``: read again every file ``release.json`` records (each stage's outputs, the ``dir:``
mirrors included) and list those whose size or sha256 differ, or that are missing. Nothing is written."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..stage import Reporter, sha256_file
from .manifest import NAME, Manifest


@dataclass
class Mismatch:
    stage: str
    path: str       # relative to the work folder where it is inside it
    problem: str


@dataclass
class VerifyResult:
    work: Path
    files: int = 0
    bytes: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def stages(self) -> list[str]:
        """The stages to rebuild, in the order they run."""
        from .stages import NAMES

        return sorted({m.stage for m in self.mismatches}, key=lambda s: NAMES.index(s) if s in NAMES else len(NAMES))


def verify_release(work: str | Path, reporter: Reporter | None = None) -> VerifyResult:
    """Re-hash everything recorded in ``work``'s manifest (see the module doc)."""
    reporter = reporter or Reporter()
    work = Path(work).absolute()
    if not (work / NAME).is_file():
        raise ConfigError(f"{work} has no {NAME}; give the work folder of a release (releaser release -o WORK)")
    manifest = Manifest.open(work, None)
    result = VerifyResult(work)
    entries = [(stage, work / entry["root"], f) for stage, entry in manifest.data["stages"].items()
               for f in entry["files"]]
    with reporter.progress("verifying", total=sum(f["size"] for _, _, f in entries)) as advance:
        for stage, root, f in entries:
            path = root / f["path"]
            shown = str(path.relative_to(work)) if path.is_relative_to(work) else str(path)
            result.files += 1
            if not path.is_file() or path.is_symlink():
                result.mismatches.append(Mismatch(stage, shown, "missing" if not path.exists() else "not a file"))
                continue
            size = path.stat().st_size
            if size != f["size"]:
                result.mismatches.append(Mismatch(stage, shown, f"{size} bytes, recorded {f['size']}"))
                continue
            digest = sha256_file(path)
            advance(size)
            result.bytes += size
            if digest != f["sha256"]:
                result.mismatches.append(Mismatch(stage, shown, f"sha256 {digest[:12]}..., recorded "
                                                                f"{f['sha256'][:12]}..."))
    return result
