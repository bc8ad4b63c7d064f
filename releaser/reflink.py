"""Copying a user's file into an output: a reflink (a copy-on-write clone: instant, no extra space, the two files
independent afterwards) where the file system can (btrfs, XFS, ...), otherwise a plain copy. Never a hard link: an
output edited in place must not change the user's input (hard links are only for files releaser itself wrote)."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from .atomic import umask

FICLONE = 0x40049409   # linux/fs.h: _IOW(0x94, 9, int)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy ``src`` to a new file ``dst`` with its times, cloned where possible; ``dst`` gets the mode of a new file
    under the user's umask (an output, not a copy of the input's permissions)."""
    src, dst = Path(src), Path(dst)
    cloned = False
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
            cloned = True
        except OSError:   # not supported here (ext4, tmpfs, another file system): copy the bytes below
            pass
    if not cloned:
        shutil.copyfile(src, dst)
    st = os.stat(src)
    os.chmod(dst, 0o666 & ~umask())
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
