"""start_writeback is a hint: it leaves the data as written and never fails the write."""

import os

from releaser.atomic import start_writeback


def test_start_writeback_keeps_data_and_ignores_bad_input(tmp_path):
    path = tmp_path / "f.bin"
    data = os.urandom(3 << 20)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        start_writeback(fd, 0, len(data))
        start_writeback(fd, 1 << 20, 0)
        start_writeback(fd, len(data), 1 << 20)     # past the end
        os.fsync(fd)
    finally:
        os.close(fd)
    start_writeback(fd, 0, 4096)                     # a closed descriptor: ignored, fsync reports real errors
    assert path.read_bytes() == data
