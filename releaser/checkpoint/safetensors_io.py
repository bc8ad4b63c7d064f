"""Minimal streaming access to the safetensors format (header + byte ranges), used for bounded-memory I/O.

The ``safetensors`` library maps whole files (every touched page counts towards the process's RSS) and its writer
needs all tensors of a file in memory; releaser reads one tensor at a time (positioned reads into a fresh buffer, or a
mapping of just that tensor's bytes, unmapped when the tensor is freed) and writes each tensor at its planned offset
as soon as it is ready. Files are validated with the ``safetensors`` library in tests.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U32": torch.uint32,   # MLX's packed weights
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: str           # path of the file holding it
    offset: int = 0     # absolute byte offset of the data (safetensors only)

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def read_header(path: str) -> tuple[dict, int]:
    """Return (header dict, absolute offset where the data starts)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("file too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError("safetensors header length is implausible")
        text = f.read(n)
        if len(text) != n:
            raise ValueError(f"truncated: the header needs {n} bytes, the file has {len(text)} after the length")
        header = json.loads(text)
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, 8 + n


def list_tensors(path: str) -> list[TensorInfo]:
    """The tensors of a safetensors file, after checking that the header and the file size agree (a truncated or
    inconsistent file fails here, before any work starts)."""
    header, start = read_header(path)
    out, end = [], 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = meta["dtype"], tuple(int(s) for s in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name} has no valid dtype, shape and data_offsets") from None
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype} for tensor {name}")
        info = TensorInfo(name, DTYPES[dtype], shape, path, start + begin)
        if not 0 <= begin <= stop or stop - begin != info.nbytes:
            raise ValueError(f"tensor {name}: data_offsets [{begin}, {stop}] do not fit {dtype} {list(shape)}")
        end = max(end, stop)
        out.append(info)
    size = os.path.getsize(path) - start
    if size < end:
        raise ValueError(f"truncated: the header describes {end} bytes of tensor data, the file holds {size}")
    if size > end:
        raise ValueError(f"inconsistent: the file holds {size} bytes of tensor data, the header describes {end}")
    return out


def read_tensor(fd: int, info: TensorInfo) -> torch.Tensor:
    """Read one tensor with positioned reads into a new buffer (thread-safe: no shared file position)."""
    out = torch.empty(info.nbytes, dtype=torch.uint8)   # not zero-filled: every byte is read into it
    view = memoryview(out.numpy()).cast("B")
    done = 0
    while done < info.nbytes:
        n = os.preadv(fd, [view[done:]], info.offset + done)
        if n <= 0:
            raise OSError(f"unexpected end of file reading {info.name} from {info.file}")
        done += n
    return out.view(info.dtype).reshape(info.shape)


def map_tensor(fd: int, info: TensorInfo) -> torch.Tensor:
    """One tensor as a private copy-on-write mapping of its bytes in the file: no copy, no fresh memory to fault in.

    Reading it reads the page cache directly; writing to it copies only the pages written (the file never changes).
    The mapping lives as long as the tensor (and its views). A tensor whose data is not aligned to its element size in
    the file (or an empty one) is read with :func:`read_tensor` instead.
    """
    size = torch.empty((), dtype=info.dtype).element_size()
    if not info.nbytes or info.offset % size:
        return read_tensor(fd, info)
    start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
    m = mmap.mmap(fd, info.offset + info.nbytes - start, flags=mmap.MAP_PRIVATE,
                  prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
    count = info.nbytes // size
    return torch.frombuffer(m, dtype=info.dtype, offset=info.offset - start, count=count).reshape(info.shape)


def layout(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict | None = None) -> tuple[bytes, dict]:
    """Plan a file: return (header bytes including the 8-byte length, {name: absolute data offset})."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offsets, pos = {}, 0
    for name, dtype, shape in tensors:
        n = torch.empty((), dtype=dtype).element_size()
        for s in shape:
            n *= s
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets[name] = pos
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, {k: start + v for k, v in offsets.items()}


def write_at(fd: int, data: memoryview | bytes, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
