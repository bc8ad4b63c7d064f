"""An importance matrix as llama-quantize uses it: ``load_imatrix`` (``tools/quantize/quantize.cpp``'s load_imatrix
over ``common/imatrix-loader.cpp``) and, per tensor, the weight rows ``llama_model_quantize`` passes to the
quantizers (``src/llama-quant.cpp``), with the ``quantize.imatrix.*`` keys llama-quantize writes."""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError

#: The GGUF keys llama-quantize adds to a file made with ``--imatrix`` (tools/quantize/quantize.cpp).
KEY_FILE = "quantize.imatrix.file"
KEY_DATASET = "quantize.imatrix.dataset"
KEY_ENTRIES = "quantize.imatrix.entries_count"
KEY_CHUNKS = "quantize.imatrix.chunks_count"
EMBEDDINGS = ("token_embd.weight", "per_layer_token_embd.weight")   # llama.cpp's tensor_name_match_token_embd


class ImatrixError(ConfigError):
    """An importance matrix file is unreadable or does not fit the model."""


@dataclass(frozen=True)
class Imatrix:
    """``weights``: tensor name -> float32 [n_matrices * n_per_row], each column's mean squared input (one row per
    expert of a mixture-of-experts tensor); ``name``: the file as given (llama-quantize writes it into the GGUF)."""

    name: str
    weights: dict[str, np.ndarray]
    datasets: list[str]
    chunk_count: int

    def metadata(self) -> dict[str, str | int]:
        """The ``quantize.imatrix.*`` values of a file made with this matrix, in llama-quantize's order (strings cut
        to 127 bytes, as its ``strncpy`` into a 128-byte field; the chunk count only when positive)."""
        def cut(s: str) -> str:
            return s.encode("utf-8")[:127].decode("utf-8", errors="ignore")

        keys: dict[str, str | int] = {KEY_FILE: cut(self.name)}
        if self.datasets:
            keys[KEY_DATASET] = cut(self.datasets[0])
        keys[KEY_ENTRIES] = len(self.weights)
        if self.chunk_count > 0:
            keys[KEY_CHUNKS] = self.chunk_count
        return keys

    def for_tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """The weights llama.cpp quantizes tensor ``name`` (numpy ``shape``) with: [n_per_row] for a matrix, or
        [n_experts, n_per_row]; None when the matrix has no entry for it (llama.cpp quantizes it without). An entry
        of another size is an error, except for the token embeddings (llama.cpp then ignores it)."""
        w = self.weights.get(name)
        if w is None:
            return None
        n_per_row, n_mat = shape[-1], (shape[0] if len(shape) == 3 else 1)
        if w.size != n_per_row * n_mat:
            if name in EMBEDDINGS:
                return None
            raise ImatrixError(f"imatrix {self.name}: the entry for {name} has {w.size} values but the tensor has "
                               f"{n_per_row * n_mat} columns{f' ({n_mat} experts)' if n_mat > 1 else ''}; the "
                               "imatrix was computed for another model: compute it on this one")
        return w.reshape(n_mat, n_per_row) if len(shape) == 3 else w


def load_imatrix(path: str | os.PathLike) -> Imatrix:
    """Read a llama.cpp importance matrix (GGUF, or the legacy ``.dat``) into the weights llama-quantize uses: GGUF
    ``in_sum2`` / ``counts`` per expert (a count of 0 gives weights of 1); legacy sums / ncall."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImatrixError(f"cannot read the imatrix {path}: {exc.strerror or exc}") from None
    try:
        entries, datasets, chunks = (_gguf if data[:4] == b"GGUF" else _legacy)(path, data)
    except (ValueError, struct.error, UnicodeDecodeError, IndexError, KeyError) as exc:
        raise ImatrixError(f"{path} is not a readable imatrix file ({exc}); give a file written by llama-imatrix or "
                           "releaser imatrix") from None
    for name, w in entries.items():
        if not np.isfinite(w).all():
            raise ImatrixError(f"imatrix {path}: the entry for {name} contains non-finite values; compute it again")
    return Imatrix(os.fspath(path), entries, datasets, chunks)


def _gguf(path: Path, data: bytes):
    from .reader import GGUFFile

    f = GGUFFile(path)
    if not f.tensors:
        raise ValueError("it holds no entries")
    if not all(k in f.values for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")):
        raise ValueError("imatrix.datasets, imatrix.chunk_count or imatrix.chunk_size is missing")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, t in f.tensors.items():
        for suffix in (".in_sum2", ".counts"):
            if name.endswith(suffix) and len(name) > len(suffix):
                if t.ggml_type != 0:
                    raise ValueError(f"{name} is not F32")
                values = np.frombuffer(data, np.float32, t.n_elements, t.offset)
                pairs.setdefault(name[: -len(suffix)], {})[suffix] = values
    entries = {}
    for name in sorted(pairs):
        if len(pairs[name]) != 2:
            raise ValueError(f"{name} has in_sum2 without counts or counts without in_sum2")
        sums, counts = pairs[name][".in_sum2"], pairs[name][".counts"]
        if counts.size == 0:
            raise ValueError(f"{name}.counts is empty")
        counts = np.array([math.floor(abs(c) + 0.5) * (1 if c >= 0 else -1) for c in counts.tolist()],
                          np.float32)   # std::lround, then back to float
        ne0 = sums.size // counts.size
        w = np.zeros(sums.size, np.float32)
        for j, c in enumerate(counts):
            w[j * ne0:(j + 1) * ne0] = sums[j * ne0:(j + 1) * ne0] / c if c > 0 else np.float32(1.0)
        entries[name] = w
    datasets = f.values["imatrix.datasets"]
    return entries, list(datasets) if isinstance(datasets, list) else [], int(f.values["imatrix.chunk_count"])


def _legacy(path: Path, data: bytes):
    pos = 0

    def take(fmt: str):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return vals[0]

    n_entries = take("i")
    if n_entries < 1:
        raise ValueError("it holds no entries")
    entries = {}
    for _ in range(n_entries):
        n = take("i")
        if n < 0 or pos + n > len(data):
            raise ValueError("a name runs past the end of the file")
        name = data[pos:pos + n].split(b"\0")[0].decode("utf-8")
        pos += n
        ncall, nval = take("i"), take("i")
        if nval < 1 or pos + 4 * nval > len(data):
            raise ValueError(f"the values of {name} run past the end of the file")
        sums = np.frombuffer(data, np.float32, nval, pos)
        pos += 4 * nval
        entries[name] = sums / np.float32(ncall) if ncall > 0 else sums.copy()
    chunks, datasets = 0, []
    if pos + 4 <= len(data):   # the chunk count and dataset name are optional
        chunks = take("i")
        if pos + 4 <= len(data):
            n = take("i")
            if n > 0 and pos + n <= len(data):
                datasets.append(data[pos:pos + n].split(b"\0")[0].decode("utf-8"))
    return entries, datasets, chunks
