"""DataSync makes data durable in the background while writes continue, and a background error fails the commit."""

import errno
import os

import pytest
import torch

from releaser import atomic
from releaser.atomic import DataSync
from releaser.checkpoint import CheckpointWriter
from releaser.errors import OutputError


def test_datasync_syncs_written_descriptors(tmp_path, monkeypatch):
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(atomic.os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    path = tmp_path / "f.bin"
    data = os.urandom(3 << 20)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    sync = DataSync()
    try:
        for i in range(3):
            os.pwrite(fd, data[i << 20:(i + 1) << 20], i << 20)
            sync.written(fd)
        sync.close()
    finally:
        os.close(fd)
    assert synced and set(synced) == {fd}
    assert path.read_bytes() == data
    sync.written(fd)          # after close: ignored (the descriptor may be gone)
    sync.close()


def test_datasync_reports_the_error_it_consumed(tmp_path, monkeypatch):
    def fail(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(atomic.os, "fdatasync", fail)
    sync = DataSync()
    sync.written(5)
    with pytest.raises(OSError, match="Input/output"):
        sync.close()
    sync.close(check=False)   # the abort path stays quiet


def test_writer_commit_fails_on_a_background_sync_error(tmp_path, monkeypatch):
    def fail(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(atomic.os, "fdatasync", fail)
    out = tmp_path / "model"
    writer = CheckpointWriter(out, [("w", torch.float32, (4, 4))])
    writer.write("w", torch.ones(4, 4))
    with pytest.raises(OutputError):
        writer.commit()
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []
