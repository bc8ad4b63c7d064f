"""Every failure the CLI can meet as one line: foreseeable errors (the OS, libraries) get a message naming the problem
and the fix; anything else gets one line plus the path of a full report (the traceback) written to a file."""

from __future__ import annotations

import datetime as dt
import errno
import os
import platform
import sys
import tempfile
import traceback
from pathlib import Path

_OS_HINTS = {
    errno.ENOSPC: "the disk is full; free space or choose another output folder",
    errno.EDQUOT: "the disk quota is exceeded; free space or choose another output folder",
    errno.EFBIG: "the file is too large for this file system; choose another output folder",
    errno.EACCES: "permission denied; check the permissions or choose another path",
    errno.EPERM: "operation not permitted; check the permissions or choose another path",
    errno.EROFS: "the file system is read-only; choose another output folder",
    errno.EISDIR: "it is a folder; give a file path",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENOENT: "no such file or folder; check the path",
    errno.EEXIST: "it already exists; pass --overwrite or choose another path",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
    errno.ENOMEM: "out of memory",
    errno.EIO: "input/output error; check the disk",
}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it unwinds (and cleans up) exactly like Ctrl-C."""


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


def _os_message(exc: OSError) -> str:
    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f)
    hint = _OS_HINTS.get(exc.errno) or one_line(exc.strerror or exc)
    return f"{where}: {hint}" if where else hint


def foreseen(exc: BaseException) -> str | None:
    """The one-line message for an error whose cause is outside releaser (the OS, a bad file), else None."""
    if isinstance(exc, OSError):
        return _os_message(exc)
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return "out of memory; close other programs, use a machine with more memory or a smaller model"
    try:
        import jinja2
        if isinstance(exc, jinja2.TemplateError):
            kind = "syntax error" if isinstance(exc, jinja2.TemplateSyntaxError) else "error"
            return f"template {kind}: {one_line(exc)}"
    except ImportError:  # pragma: no cover
        pass
    try:
        from safetensors import SafetensorError
        if isinstance(exc, SafetensorError):
            return f"invalid safetensors file: {one_line(exc)}; re-download the model"
    except ImportError:  # pragma: no cover
        pass
    try:
        import yaml
        if isinstance(exc, yaml.YAMLError):
            return f"invalid YAML: {one_line(exc)}"
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, UnicodeError):
        return f"a file is not valid UTF-8 text ({one_line(exc)})"
    return None


def report_dirs() -> list[Path]:
    """Where crash reports go: ``$RELEASER_CRASH_DIR``, else ~/.cache/releaser, else the temp folder."""
    env = os.environ.get("RELEASER_CRASH_DIR")
    dirs = [Path(env)] if env else []
    return dirs + [Path.home() / ".cache" / "releaser", Path(tempfile.gettempdir())]


def write_report(exc: BaseException, argv: list[str] | None = None) -> Path | None:
    """Write the traceback and the context of an unforeseen error to ``crash-*.txt``; its path, or None."""
    from .. import __version__

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = (f"releaser {__version__} crash report {dt.datetime.now().isoformat(timespec='seconds')}\n"
            f"command: {' '.join(argv if argv is not None else sys.argv)}\n"
            f"python {platform.python_version()} on {platform.platform()}\n\n"
            + "".join(traceback.format_exception(exc)))
    for folder in report_dirs():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f"crash-{stamp}-", suffix=".txt", dir=folder)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            return Path(name)
        except OSError:
            continue
    return None


def unforeseen(exc: BaseException) -> str:
    """One line for a bug or an unexpected library error, naming where the full report was written."""
    path = write_report(exc)
    where = f"the full report is in {path}" if path else "the report could not be written (no writable folder)"
    return f"unexpected {type(exc).__name__}: {one_line(exc)[:300]}; {where}; please report it with that file"
