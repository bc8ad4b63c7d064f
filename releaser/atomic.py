"""The one way releaser writes outputs, for every stage and command.

- An output (a folder, or a file) is written under a temporary name in the same folder, unique per run
  (``.NAME.releaser-tmp-<random>``), fsynced, and renamed into place only when complete.
- A lock beside the output (``.NAME.releaser-lock``, ``flock``) lets one run write it at a time: a second run fails
  at once with a one-line error instead of destroying the first run's work. The lock file is removed on release.
- Under the lock, temporary entries of earlier runs that were killed (kill -9, power loss) are removed, so nothing a
  dead run left behind survives the next run.
- Replacing an existing folder (``overwrite``) swaps old and new in one ``renameat2(RENAME_EXCHANGE)`` where the
  file system supports it, so there is no moment without an output; elsewhere it falls back to two renames.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError

TMP_TAG = ".releaser-tmp-"
OLD_TAG = ".releaser-old-"
LOCK_TAG = ".releaser-lock"
_LEGACY = (".releaser-tmp", ".releaser-old")  # fixed names of releaser <= 0.1 (one run at a time)


def os_error(exc: OSError, where: Path) -> OutputError:
    """A one-line OutputError for an OSError met while writing ``where``."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return OutputError(f"not enough disk space to write {where} ({exc.strerror}); free space or choose another "
                           "folder")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"{where} is not writable ({exc.strerror}); check the folder's permissions or choose "
                           "another output")
    if exc.errno == errno.EISDIR:
        return OutputError(f"{where} is a folder; give a file path")
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return OutputError(f"{where} is not writable: a part of its path is a file, not a folder; choose another "
                           "output")
    return OutputError(f"cannot write {where}: {exc.strerror or exc}")


def hidden(path: Path, tag: str) -> str:
    return f".{path.name}{tag}"


class OutputLock:
    """An exclusive, non-blocking lock on an output path, held by a lock file beside it (removed on release).

    The lock file never exists unlocked: it is created under a unique staging name (``.NAME.releaser-lock-<random>``),
    locked, and only then hard-linked to its real name (which fails if another run's file is there). So a signal at
    any point leaves either nothing, or a file whose inode is ours and which :meth:`release` removes; a file left by a
    killed run (kill -9 frees its lock) is unlocked, hence stale, and is removed by the next run.
    """

    busy = "another releaser run (pid {pid}) is writing {path}; wait for it to finish or choose another output"

    def __init__(self, path: Path, file: Path | None = None):
        self.path = Path(path).absolute()
        self.file = Path(file).absolute() if file else self.path.parent / hidden(self.path, LOCK_TAG)
        self._staging = self.file.parent / f"{self.file.name}-{os.urandom(6).hex()}"
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        _live.add(self)
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            for _ in range(100):  # bounded: a pass repeats only when it removed a stale lock file or lost a race
                if self._attempt():
                    _remove_stale_staging(self.file)
                    return self
            raise OutputError(f"cannot lock {self.path}: its lock file keeps changing")
        except OSError as exc:
            self.release()
            raise os_error(exc, self.path) from exc
        except BaseException:   # Ctrl-C, SIGTERM, another run holding it: whatever this run created goes
            self.release()
            raise

    def _attempt(self) -> bool:
        if self._fd is None:
            self._fd = os.open(self._staging, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # a new private file: cannot be held by another
            os.write(self._fd, f"{os.getpid()}\n".encode())
        try:
            os.link(self._staging, self.file)
        except FileExistsError:
            if _remove_if_stale(self.file):
                return False
            raise OutputError(self.busy.format(pid=_holder(self.file), path=self.path)) from None
        except FileNotFoundError:   # the staging file was removed by a run taking the lock meanwhile: start over
            fd, self._fd = self._fd, None
            os.close(fd)
            return False
        os.unlink(self._staging)
        return True

    def release(self) -> None:
        """Remove the temporary entries beside the output (while held, no other run owns them), what this lock created
        (the lock file only when it is this run's), and unlock; safe in any state."""
        try:
            self._clean_up()
        except KeyboardInterrupt:   # Ctrl-C or SIGTERM before the removal happened: it must still happen
            self._clean_up()
            raise
        finally:
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)
            _live.discard(self)

    @property
    def held(self) -> bool:
        return self._fd is not None and _same_file(self.file, self._fd)

    def _clean_up(self) -> None:
        held = self.held
        if held:
            sweep(self.path)
        try:
            os.unlink(self._staging)   # a unique name: if it exists, this run made it
        except (FileNotFoundError, NotADirectoryError):   # never made (its folder may not even be one)
            pass
        if held:
            try:
                os.unlink(self.file)
            except FileNotFoundError:
                pass

    def __enter__(self) -> OutputLock:
        try:
            return self.acquire()
        except BaseException:
            self.release()
            raise

    def __exit__(self, *exc) -> None:
        self.release()


_live: set[OutputLock] = set()   # locks being taken or held by this process


def release_all() -> None:
    """Release every lock this process still holds or was taking. The CLI calls it when Ctrl-C or SIGTERM ends a
    command, so an interrupt that came between two steps of a caller (a lock taken, not yet recorded) still leaves
    nothing behind."""
    for lock in list(_live):
        lock.release()


def _same_file(path: Path, fd: int) -> bool:
    try:
        st, own = os.stat(path), os.fstat(fd)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _remove_if_stale(path: Path) -> bool:
    """Remove the lock (or staging) file ``path`` unless a process holds it (then it is a live run's: False)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if _same_file(path, fd):
            os.unlink(path)
        return True
    finally:
        os.close(fd)


def _holder(file: Path) -> str:
    try:
        with open(file, "rb") as fh:
            return fh.read(32).decode("ascii", "replace").strip() or "unknown"
    except OSError:
        return "unknown"


def _remove_stale_staging(file: Path) -> None:
    """Staging files of runs killed while taking the lock ``file`` (a live run's is locked and stays)."""
    prefix = file.name + "-"
    try:
        entries = [e for e in file.parent.iterdir() if e.name.startswith(prefix)]
    except OSError:
        return
    for entry in entries:
        try:
            _remove_if_stale(entry)
        except OSError:
            pass


def sweep(path: Path) -> None:
    """Remove what killed runs left beside ``path`` (call with ``path``'s lock held: no live run owns them)."""
    path = Path(path)
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    # temporary entries, and the locks a killed run took on its own temporary folder ("..NAME.releaser-tmp-*")
    prefixes = (hidden(path, TMP_TAG), hidden(path, OLD_TAG), "." + hidden(path, TMP_TAG))
    legacy = {hidden(path, tag) for tag in _LEGACY}
    for entry in entries:
        if entry.name.startswith(prefixes) or entry.name in legacy:
            remove(entry)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` and the folders themselves, so a rename publishes durable data."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = None


class DataSync:
    """Makes written data durable while more is being written, so the fsync before the rename has little left to do.

    Call :meth:`written` after each write to a file descriptor; a background thread fdatasyncs the descriptors written
    since its last pass, over and over while writes come. Most of an fsync's time can be the disk's cache flush rather
    than the writeback (on a virtual disk the host writes its cache out only then): 1 GB written over 2 s on this
    project's machines left a 1.2 s fsync without it, 0.1 s with it. :meth:`close` stops the thread (call it before
    closing the descriptors) and raises the first error a background fdatasync met: that fdatasync consumed it, so the
    commit's own fsync would not report it.
    """

    def __init__(self) -> None:
        self._dirty: set[int] = set()
        self._cond = threading.Condition()
        self._closed = False
        self._error: OSError | None = None
        self._thread: threading.Thread | None = None

    def written(self, fd: int) -> None:
        with self._cond:
            if self._closed:
                return
            self._dirty.add(fd)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="releaser-datasync", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._dirty or self._closed)
                if not self._dirty:   # closed, and everything written has been synced
                    return
                fds, self._dirty = self._dirty, set()
            for fd in fds:
                try:
                    os.fdatasync(fd)
                except OSError as exc:
                    with self._cond:
                        self._error = self._error or exc

    def close(self, *, check: bool = True) -> None:
        """Sync what is left and stop; with ``check``, raise the first error met (the caller's commit must fail on
        it). Without ``check`` (an abort), what is left is not synced."""
        with self._cond:
            self._closed = True
            if not check:
                self._dirty.clear()
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        if check and self._error is not None:
            raise self._error


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2); False where the system cannot."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        fn = _libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(new: Path, out: Path) -> None:
    """Put the complete folder ``new`` at ``out`` (same parent), replacing an old ``out`` without a gap."""
    if out.exists() or out.is_symlink():
        if exchange(new, out):
            remove(new)  # ``new`` now holds the old output
        else:
            old = Path(tempfile.mkdtemp(prefix=hidden(out, OLD_TAG), dir=out.parent))
            os.replace(out, old / "x")
            os.replace(new, out)
            remove(old)
    else:
        os.replace(new, out)
    fsync_dir(out.parent)


def umask() -> int:
    """The process's umask."""
    try:   # Linux >= 4.7: read without the set-and-restore race of os.umask
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_new(out: Path, overwrite: bool, *, kind: str = "folder") -> None:
    """Refuse an existing output without ``overwrite``, and an existing output of the wrong kind."""
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise OutputError(f"{out} already exists; pass --overwrite to replace it or choose another output")
    if kind == "folder" and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder; choose another output path")
    if kind == "file" and out.is_dir():
        raise OutputError(f"{out} is a folder; give a file path")


class PendingDir:
    """A folder being written: ``tmp`` (unique, beside ``out``, locked) becomes ``out`` on :meth:`commit`, or is
    removed on :meth:`abort`. :func:`output_dir` is the context-manager form."""

    def __init__(self, out: str | os.PathLike, *, overwrite: bool = False):
        self.out = Path(out).absolute()
        self._lock = OutputLock(self.out)
        try:
            self._lock.acquire()
            check_new(self.out, overwrite)
            sweep(self.out)
            self.tmp = Path(tempfile.mkdtemp(prefix=hidden(self.out, TMP_TAG), dir=self.out.parent))
            os.chmod(self.tmp, 0o777 & ~umask())   # mkdtemp makes 0700; the output gets the user's umask
        except OSError as exc:
            self._lock.release()
            raise os_error(exc, self.out) from exc
        except BaseException:   # interrupted, perhaps after mkdtemp made the folder: releasing the lock sweeps it
            self._lock.release()
            raise

    def commit(self) -> Path:
        try:
            fsync_tree(self.tmp)
            replace_dir(self.tmp, self.out)
        except OSError as exc:
            self.abort()
            raise os_error(exc, self.out) from exc
        except BaseException:   # Ctrl-C or SIGTERM while publishing: no temporary folder or lock is left
            self.abort()
            raise
        self._lock.release()
        return self.out

    def abort(self) -> None:
        remove(self.tmp)
        self._lock.release()


@contextmanager
def output_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Write a whole folder: yields an empty temporary folder beside ``out`` that becomes ``out`` when the block ends
    without error (durably, in one rename); on error or interruption it is removed and ``out`` is untouched."""
    pending = PendingDir(out, overwrite=overwrite)
    try:
        yield pending.tmp
    except BaseException:
        pending.abort()
        raise
    pending.commit()


@contextmanager
def output_files(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Write several files into an existing or new folder that may hold other files (a GGUF folder): yields a
    temporary folder inside ``out_dir``; when the block ends its files are renamed into ``out_dir`` (each rename is
    atomic; files whose name ends in ``-00001-of-NNNNN.gguf`` or similar first parts go last, so a split set is only
    found once whole). Existing files are replaced only with ``overwrite``."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir} exists and is not a folder; choose another output folder")
    with OutputLock(out_dir):
        created = not out_dir.exists()   # a folder this run creates goes again if the run fails
        try:
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
                for entry in out_dir.iterdir():  # staging folders of killed runs
                    if entry.name.startswith(TMP_TAG):
                        remove(entry)
                tmp = Path(tempfile.mkdtemp(prefix=TMP_TAG, dir=out_dir))
            except OSError as exc:
                raise os_error(exc, out_dir) from exc
            try:
                yield tmp
                staged = sorted(tmp.iterdir(), key=lambda p: ("-00001-of-" in p.name, p.name))
                for path in staged:
                    check_new(out_dir / path.name, overwrite, kind="file")
                try:
                    fsync_tree(tmp)
                    for path in staged:
                        os.replace(path, out_dir / path.name)
                    fsync_dir(out_dir)
                except OSError as exc:
                    raise os_error(exc, out_dir) from exc
            finally:
                remove(tmp)
        except BaseException:   # interrupted, perhaps right after mkdtemp: the lock is ours, so sweep
            if out_dir.is_dir():
                for entry in out_dir.iterdir():
                    if entry.name.startswith(TMP_TAG):
                        remove(entry)
            raise
        finally:
            if created:
                try:
                    out_dir.rmdir()   # succeeds only while empty: a first run that failed or was stopped
                except OSError:
                    pass


def write_file(path: str | os.PathLike, data: str | bytes, *, overwrite: bool = True, mode: int | None = None) -> Path:
    """Write one file atomically (unique temporary name beside it, fsync, rename). An existing file keeps its mode
    unless ``mode`` is given; a new one gets 0666 less the umask, as open() gives."""
    path = Path(path).absolute()
    with OutputLock(path):
        check_new(path, overwrite, kind="file")
        sweep(path)
        with temp_file(path, mode=mode) as tmp:
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            except OSError as exc:
                raise os_error(exc, path) from exc
    return path


@contextmanager
def temp_file(path: Path, *, mode: int | None = None) -> Iterator[Path]:
    """A unique temporary path beside ``path`` for the caller to fill; renamed over ``path`` when the block ends
    without error (with ``path``'s old mode, or ``mode``), removed otherwise. Hold ``path``'s lock around it."""
    path = Path(path).absolute()
    try:
        fd, name = tempfile.mkstemp(prefix=hidden(path, TMP_TAG), dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise os_error(exc, path) from exc
    tmp = Path(name)
    try:
        yield tmp
        if mode is None:
            try:
                mode = path.stat().st_mode & 0o7777
            except FileNotFoundError:
                mode = 0o666 & ~umask()
        os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        raise os_error(exc, path) from exc
    finally:
        tmp.unlink(missing_ok=True)
