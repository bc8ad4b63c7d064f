"""CheckpointReader.map: the same tensors as read(), without copying, never changing the file."""

import hashlib

import torch

from releaser.checkpoint import CheckpointReader
from releaser_testing import tiny_model


def test_map_equals_read_and_writes_stay_private(tmp_path):
    folder = tiny_model(tmp_path / "m", seed=3)
    files = sorted(folder.glob("*.safetensors"))
    digest = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    with CheckpointReader(folder) as reader:
        for name in reader.tensors:
            mapped = reader.map(name)
            read = reader.read(name)
            assert mapped.dtype == read.dtype and mapped.shape == read.shape
            assert torch.equal(mapped, read)
            mapped.add_(1)        # copy-on-write: only this tensor changes
            assert not torch.equal(mapped, read) or not read.numel()
            assert torch.equal(reader.map(name), read)
    assert [hashlib.sha256(f.read_bytes()).hexdigest() for f in files] == digest


def test_map_of_bf16_and_misaligned_offsets(tmp_path):
    from releaser.checkpoint import safetensors_io as st

    path = tmp_path / "x.safetensors"
    a = torch.arange(5, dtype=torch.uint8)            # 5 bytes: the next tensor starts at an odd offset
    b = torch.randn(3, 7).to(torch.bfloat16)
    header, offsets = st.layout([("a", a.dtype, a.shape), ("b", b.dtype, tuple(b.shape))])
    with open(path, "wb") as f:
        f.write(header + a.numpy().tobytes() + b.view(torch.uint8).numpy().tobytes())
    infos = {i.name: i for i in st.list_tensors(str(path))}
    assert infos["b"].offset % 2 == 1
    import os

    fd = os.open(path, os.O_RDONLY)
    try:
        assert torch.equal(st.map_tensor(fd, infos["a"]), a)
        assert torch.equal(st.map_tensor(fd, infos["b"]), b)   # read, not mapped: misaligned
    finally:
        os.close(fd)
