"""``release.json``: what a release was made from and what it wrote, and the memory that lets a rerun skip work.

It records the recipe, releaser's and the key libraries' versions, every input (path or repo id, sha256 of its
files), and for each stage its fingerprint (options and input hashes) and the files it wrote (path, size, sha256,
mtime). A ``checksum`` over the rest detects a file that was edited by hand or truncated: such a manifest is
refused, never trusted.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path

from .. import __version__
from ..atomic import write_file
from ..errors import ConfigError
from ..stage import OutputFile, sha256_file

NAME = "release.json"
FORMAT = 1
LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "huggingface_hub", "gguf", "numpy")


class ManifestError(ConfigError):
    """The work folder's manifest cannot be used (damaged, edited, or another release's)."""


def _checksum(data: dict) -> str:
    body = {k: v for k, v in data.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str, separators=(",", ":")).encode()).hexdigest()


@cache
def _source_digest(package: str) -> str:
    """sha256 over every file of one of releaser's subpackages (``gguf``, ``templates``, ...): its code's version."""
    if package == "templates":
        from ..resources import templates_dir
        root = templates_dir()
    else:
        root = Path(__file__).resolve().parents[1] / package
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def code_versions(code: tuple[str, ...]) -> dict[str, str]:
    """The versions of the code that makes a stage's bytes: ``releaser.X`` -> a digest of that subpackage's files,
    a library -> its installed version. A stage whose code changed (an upgrade) runs again."""
    out = {}
    for name in code:
        if name.startswith("releaser."):
            out[name] = _source_digest(name.split(".", 1)[1])
        else:
            try:
                out[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                out[name] = "not installed"
    return out


def versions() -> dict[str, str]:
    out = {"releaser": __version__}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            pass
    return out


@dataclass
class Manifest:
    """Only the driver writes it; stages running side by side (Ray) hash files through it from several threads at
    once, so every change and the save hold ``lock``."""

    path: Path
    data: dict = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    @classmethod
    def open(cls, work_dir: Path, release: str | None, *, force: bool = False) -> Manifest:
        """The manifest of ``work_dir`` for the release ``release`` (repo id; None: whichever it holds); a new one
        when there is none, or when it is damaged and ``force`` is given."""
        path = work_dir / NAME
        fresh = cls(path, {"format": FORMAT, "release": release, "stages": {}, "inputs": {}, "hashes": {}})
        if not path.exists():
            return fresh
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            ok = isinstance(data, dict) and data.get("checksum") == _checksum(data) and data.get("format") == FORMAT
        except (OSError, ValueError, UnicodeDecodeError):
            ok, data = False, None
        if not ok:
            if force:
                return fresh
            raise ManifestError(f"{path} is damaged or was edited by hand (its checksum does not match), so it is "
                                "not trusted; move it away or rerun with --force to rebuild every stage")
        if release is not None and data.get("release") != release:
            raise ManifestError(f"{work_dir} holds the release of {data.get('release')!r}, not {release!r}; choose "
                                "another work folder with -o")
        return cls(path, data)

    def save(self) -> None:
        with self.lock:
            self.data["versions"] = versions()
            self.data["updated"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            self.data["checksum"] = _checksum(self.data)
            write_file(self.path, json.dumps(self.data, indent=2, sort_keys=True) + "\n")

    # -- stages ------------------------------------------------------------------------------------------------------
    def stage(self, name: str) -> dict | None:
        return self.data["stages"].get(name)

    def record(self, name: str, entry: dict) -> None:
        with self.lock:
            self.data["stages"][name] = entry
            self.save()

    def forget(self, name: str) -> None:
        with self.lock:
            if self.data["stages"].pop(name, None) is not None:
                self.save()

    def recorded(self, folder: Path) -> dict[str, dict]:
        """Every file a stage before publishing recorded under ``folder``: relative path -> {sha256, size, stage}."""
        folder = Path(os.path.normpath(Path(folder).absolute()))
        work = self.path.parent.absolute()
        out = {}
        with self.lock:
            stages = list(self.data["stages"].items())
        for stage, entry in stages:
            if stage == "publish":
                continue
            for f in entry["files"]:
                path = Path(os.path.normpath(work / entry["root"] / f["path"]))
                if path.is_relative_to(folder):
                    out[path.relative_to(folder).as_posix()] = {"sha256": f["sha256"], "size": f["size"],
                                                                "stage": stage}
        return out

    # -- file hashes (a cache keyed by path, size and mtime, like git's index) ------------------------------------
    def hash(self, path: Path) -> str:
        path = Path(path).absolute()
        st = path.stat()
        key = self._key(path)
        cached = self.data["hashes"].get(key)
        if cached and cached[0] == st.st_size and cached[1] == st.st_mtime_ns:
            return cached[2]
        digest = sha256_file(path)
        with self.lock:
            self.data["hashes"][key] = [st.st_size, st.st_mtime_ns, digest]
        return digest

    def _key(self, path: Path) -> str:
        """Files of the work folder by relative path (the folder can move), others by absolute path."""
        work = self.path.parent.absolute()
        return path.relative_to(work).as_posix() if path.is_relative_to(work) else str(path)

    def describe(self, root: Path, paths: list[Path] | None = None) -> list[OutputFile]:
        """Like :func:`releaser.stage.describe_files`, through the hash cache."""
        root = Path(root)
        if paths is None:
            paths = [p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".")
                                                                            for part in p.relative_to(root).parts)]
        out = [OutputFile(Path(p).relative_to(root).as_posix(), Path(p).stat().st_size, self.hash(p)) for p in paths]
        return sorted(out, key=lambda f: f.path)

    def intact(self, root: Path, files: list[dict], *, rehash: bool = False) -> str | None:
        """None when every recorded file is there with its size and sha256 (from the cache unless ``rehash``);
        otherwise what is wrong."""
        for f in files:
            path = Path(root) / f["path"]
            if not path.is_file():
                return f"{path} is missing"
            if path.stat().st_size != f["size"]:
                return f"{path} has {path.stat().st_size} bytes, the manifest says {f['size']}"
            digest = sha256_file(path) if rehash else self.hash(path)
            if digest != f["sha256"]:
                return f"{path} changed (sha256 {digest[:12]}..., the manifest says {f['sha256'][:12]}...)"
        return None


def relative(path: Path, root: Path) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return str(path)
