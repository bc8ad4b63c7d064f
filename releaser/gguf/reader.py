"""The one read-only GGUF reader (release gate, cards, quality, gguf-fix): the metadata values and tensor table of a
file, validated on open (a folder, a missing file, another format, a truncated or damaged file: a one-line ModelError
naming the file), tensor bytes read with plain file I/O. gguf-py's GGUFReader builds a numpy view per array element on
open (seconds for a 49k-token vocabulary and its merges); this walks the header once with struct and decodes arrays of
strings (the vocabulary, the merges) only when asked for."""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ModelError

MAGIC = b"GGUF"

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]     # numpy order (rows first): ggml's ne reversed
    ggml_type: int
    offset: int                # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class _Strings:
    """An array of ``n`` strings starting at byte ``offset`` of the file, ``nbytes`` long; decoded on access."""

    offset: int
    n: int
    nbytes: int


class _Values(Mapping):
    """Metadata key -> value, arrays of strings decoded (from the file) on first access."""

    def __init__(self, path: Path, raw: dict):
        self._path, self._raw = path, raw

    def __getitem__(self, key):
        value = self._raw[key]
        if isinstance(value, _Strings):
            with open(self._path, "rb") as fh:
                fh.seek(value.offset)
                data = fh.read(value.nbytes)
            out, pos = [], 0
            for _ in range(value.n):
                (n,) = struct.unpack_from("<Q", data, pos)
                out.append(data[pos + 8: pos + 8 + n].decode("utf-8"))
                pos += 8 + n
            value = self._raw[key] = out
        return value

    def __iter__(self):
        return iter(self._raw)

    def __len__(self):
        return len(self._raw)


class GGUFFile:
    """``values``: metadata key -> value (strings decoded; arrays of strings as lists); ``tensors``: name -> info."""

    def __init__(self, path: str | os.PathLike):
        self.path = path = Path(path)
        if path.is_dir():
            raise ModelError(f"{path} is a folder; pass the path of a .gguf file")
        if not path.is_file():
            raise ModelError(f"{path} does not exist; pass the path of a .gguf file")
        try:
            with open(path, "rb") as fh:
                if fh.read(4) != MAGIC:
                    raise ModelError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
                with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                    raw, self.tensors = self._parse(buf)
            self.values = _Values(path, raw)
        except OSError as exc:
            raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from None
        except (ValueError, struct.error, UnicodeDecodeError, IndexError, KeyError) as exc:
            raise ModelError(f"{path} is truncated or damaged ({exc}); re-export or re-download it") from None

    @staticmethod
    def _parse(buf: mmap.mmap):
        pos = 8
        size = len(buf)

        def take(fmt: str):
            nonlocal pos
            vals = struct.unpack_from("<" + fmt, buf, pos)
            pos += struct.calcsize("<" + fmt)
            return vals[0] if len(vals) == 1 else vals

        def string() -> str:
            nonlocal pos
            n = take("Q")
            if pos + n > size:
                raise ValueError("a string runs past the end of the file")
            pos += n
            return buf[pos - n: pos].decode("utf-8")

        def value(vtype: int):
            nonlocal pos
            if vtype == _STRING:
                return string()
            if vtype == _ARRAY:
                sub, n = take("IQ")
                if sub == _STRING:   # walk the lengths only
                    start = pos
                    for _ in range(n):
                        pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
                    if pos > size:
                        raise ValueError("a string array runs past the end of the file")
                    return _Strings(start, n, pos - start)
                if sub == _ARRAY:
                    return [value(_ARRAY) for _ in range(n)]
                fmt = "<" + _SCALARS[sub]
                arr = np.frombuffer(buf, dtype=np.dtype(fmt), count=n, offset=pos)
                pos += arr.nbytes
                out = arr.tolist()
                del arr   # no view may outlive the mapping
                return out
            return take(_SCALARS[vtype])

        n_tensors, n_kv = take("QQ")
        values = {}
        for _ in range(n_kv):
            key = string()
            values[key] = value(take("I"))
        infos = []
        for _ in range(n_tensors):
            name = string()
            n_dims = take("I")
            ne = [take("Q") for _ in range(n_dims)]
            ggml_type, offset = take("IQ")
            infos.append((name, ne, ggml_type, offset))
        alignment = int(values.get("general.alignment", 32))
        start = (pos + alignment - 1) // alignment * alignment
        tensors = {}
        import gguf

        for name, ne, ggml_type, offset in infos:
            block, nbytes_block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
            nbytes = int(np.prod(ne)) // block * nbytes_block
            if start + offset + nbytes > size:
                raise ValueError(f"tensor {name} runs past the end of the file (truncated download?)")
            tensors[name] = TensorInfo(name, tuple(int(x) for x in reversed(ne)), ggml_type, start + offset, nbytes)
        return values, tensors

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes, read from the file."""
        t = self.tensors[name]
        data = bytearray(t.nbytes)
        with open(self.path, "rb") as fh:
            fh.seek(t.offset)
            if fh.readinto(data) != t.nbytes:
                raise ModelError(f"{self.path} ends inside tensor {name} (truncated download?)")
        return np.frombuffer(data, dtype=np.uint8)

    def dequantize(self, name: str, chunk_bytes: int = 8 << 20) -> np.ndarray:
        """The tensor as a new float32 array in numpy order. Quantized tensors are dequantized ``chunk_bytes`` of
        output at a time into that array (gguf-py's temporaries are several times the size of what it dequantizes: a
        whole embedding at once would double the memory a model needs while loading)."""
        import gguf

        t = self.tensors[name]
        qtype = gguf.GGMLQuantizationType(t.ggml_type)
        raw = self.raw(name)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
            return raw.view(dtype).astype(np.float32, copy=False).reshape(t.shape)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        cols = t.shape[-1]
        rows = raw.reshape(-1, cols // block * size)
        out = np.empty((rows.shape[0], cols), dtype=np.float32)
        step = max(1, chunk_bytes // (4 * cols))
        for at in range(0, rows.shape[0], step):
            out[at: at + step] = gguf.quants.dequantize(rows[at: at + step], qtype)
        return out.reshape(t.shape)


def open_gguf(path: str | os.PathLike):
    """gguf-py's :class:`gguf.GGUFReader` of ``path`` (typed fields, for rewriting a file's metadata), after
    :class:`GGUFFile` has validated it."""
    import gguf

    GGUFFile(path)
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - gguf-py raises ValueError, struct and numpy errors for a broken file
        raise ModelError(f"{path} is truncated or damaged; re-export or re-download it") from exc
