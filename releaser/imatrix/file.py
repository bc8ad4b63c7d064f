"""Importance-matrix files as llama.cpp reads and writes them (tools/imatrix/imatrix.cpp, common/imatrix-loader.cpp):

- GGUF (llama-imatrix's default): ``general.type = imatrix``, ``imatrix.datasets`` (strings),
  ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32), and per weight matrix two F32 tensors,
  ``<tensor>.in_sum2`` [n_mat, n_cols] (the sum of squared input activations per input column, one row per expert
  of an MoE tensor) and ``<tensor>.counts`` [n_mat, 1] (the activations summed: tokens, or tokens routed to the
  expert), tensors sorted by name. releaser adds ``releaser.imatrix.datasets_sha256`` (the sha256 of each dataset's
  text, "" where unknown), which llama.cpp ignores;
- the legacy ``.dat`` (``--output-format dat``): per entry its name, ``ncall`` (chunks) and the mean squared
  activation times ncall; then the chunk count and the dataset name. It keeps no per-expert counts.

``read_imatrix(path)`` gives, per GGUF tensor, exactly the importance values llama-quantize passes to the quantization
functions (tools/quantize/quantize.cpp ``load_imatrix``). ``merge`` adds several files as ``llama-imatrix --in-file
a --in-file b`` does; ``write_gguf`` / ``write_dat`` write byte for byte what llama-imatrix writes for the same data."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import OutputLock, check_new, os_error, sweep, temp_file
from ..errors import ModelError

GGUF_MAGIC = b"GGUF"
ALIGNMENT = 32
SHA_KEY = "releaser.imatrix.datasets_sha256"
DEFAULT_CHUNK_SIZE = 512   # llama-imatrix's -c default: what it records when merging files without a text


@dataclass
class Entry:
    sums: np.ndarray      # float32 [n_mat, n_cols]: sum of squared activations per input column (per expert)
    counts: np.ndarray    # int64 [n_mat]: activations summed (legacy files: ncall, the chunks)

    @property
    def cols(self) -> int:
        return int(self.sums.shape[1])


@dataclass
class Imatrix:
    entries: dict[str, Entry]               # GGUF weight name (blk.0.attn_q.weight) -> its statistics
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0                     # tokens per chunk (0 in a legacy file)
    sha256: list[str] = field(default_factory=list)   # per dataset, "" when unknown
    legacy: bool = False                    # read from a .dat: sums are mean * ncall, counts are [ncall]
    path: Path | None = None

    def importance(self) -> dict[str, np.ndarray]:
        """Per tensor, the float32 values llama-quantize hands to the quantization functions: ``in_sum2 / count``
        per expert (1 where an expert got no activation), flattened expert-major (length n_expert * n_cols; expert
        e's columns at [e * n_cols, (e + 1) * n_cols)); from a legacy file ``sums / ncall``."""
        out = {}
        for name, e in self.entries.items():
            sums = e.sums.astype(np.float32, copy=False)
            if self.legacy:
                ncall = int(e.counts[0]) if e.counts.size else 0
                out[name] = (sums / np.float32(ncall)).reshape(-1) if ncall > 0 else sums.reshape(-1).copy()
                continue
            counts = np.array([float(c) for c in e.counts], dtype=np.float32)[:, None]
            values = np.where(counts > 0, sums / np.where(counts > 0, counts, np.float32(1)), np.float32(1))
            out[name] = values.astype(np.float32).reshape(-1)
        return out


def read_imatrix(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 importance per input column (per expert, expert-major) of a GGUF or legacy
    ``.dat`` imatrix file: exactly what llama-quantize passes to the quantization functions (see
    :meth:`Imatrix.importance`). A file without the imatrix metadata, truncated or of another format: one-line
    ModelError."""
    return read(path).importance()


# ---------------------------------------------------------------------------------------------------- reading


def read(path: str | os.PathLike) -> Imatrix:
    """A GGUF imatrix, or failing the GGUF magic a legacy ``.dat`` (as llama.cpp tries them)."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"{path} is a folder; pass an imatrix file (.gguf or .dat)")
    if not path.is_file():
        raise ModelError(f"imatrix file {path} does not exist")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from None
    out = _read_gguf(path) if magic == GGUF_MAGIC else _read_dat(path)
    out.path = path
    return out


def _read_gguf(path: Path) -> Imatrix:
    from ..gguf.reader import GGUFFile

    f = GGUFFile(path)   # a truncated or damaged file is a one-line ModelError
    v = f.values
    kind = v.get("general.type")
    if kind != "imatrix":   # (llama.cpp does not look, but a model file passed by mistake is named so here)
        what = f"a {v.get('general.architecture')} model" if "general.architecture" in v else f"type {kind!r}"
        raise ModelError(f"{path} is a GGUF file but not an imatrix ({what}); pass an imatrix file")
    missing = [k for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size") if k not in v]
    if missing:
        raise ModelError(f"{path} has no {missing[0]} (llama-quantize refuses an imatrix without its metadata); "
                         "write it again with a recent llama-imatrix or releaser imatrix")
    pairs: dict[str, dict[str, object]] = {}
    for name, info in f.tensors.items():
        for suffix in (".in_sum2", ".counts"):
            if name.endswith(suffix):
                pairs.setdefault(name[: -len(suffix)], {})[suffix] = info
    if not pairs:
        raise ModelError(f"{path} holds no imatrix entries (no <tensor>.in_sum2 / .counts tensors)")
    entries = {}
    for name in sorted(pairs):
        got = pairs[name]
        if len(got) != 2:
            have = next(iter(got))
            raise ModelError(f"{path}: {name}{have} has no {'.counts' if have == '.in_sum2' else '.in_sum2'} "
                             "tensor; the file is damaged")
        sums, counts = got[".in_sum2"], got[".counts"]
        if sums.ggml_type != 0 or counts.ggml_type != 0:
            raise ModelError(f"{path}: the sums and counts of {name} must be F32")
        n_mat = counts.n_elements
        if n_mat < 1 or sums.n_elements % n_mat:
            raise ModelError(f"{path}: {name} has {sums.n_elements} sums for {n_mat} counts; the file is damaged")
        s = f.raw(name + ".in_sum2").view("<f4").reshape(n_mat, -1)
        c = f.raw(name + ".counts").view("<f4")
        entries[name] = Entry(s.astype(np.float32), np.array([_lround(x) for x in c], dtype=np.int64))
    datasets = list(v["imatrix.datasets"])
    shas = list(v.get(SHA_KEY) or [])
    shas = shas + [""] * (len(datasets) - len(shas)) if len(shas) <= len(datasets) else shas[: len(datasets)]
    return Imatrix(entries, datasets, int(v["imatrix.chunk_count"]), int(v["imatrix.chunk_size"]), shas)


def _lround(x: float) -> int:   # std::lround: halves away from zero
    return int(np.sign(x) * np.floor(abs(float(x)) + 0.5))


def _read_dat(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str, what: str):
        nonlocal pos
        size = struct.calcsize("<" + fmt)
        if pos + size > len(data):
            raise ModelError(f"{path} ends inside {what}; the imatrix file is truncated (re-download or recompute it)")
        vals = struct.unpack_from("<" + fmt, data, pos)
        pos += size
        return vals[0] if len(vals) == 1 else vals

    not_imatrix = (f"{path} is neither a GGUF imatrix nor a legacy .dat imatrix; pass a file written by "
                   "llama-imatrix or releaser imatrix")
    n_entries = take("i", "the entry count") if len(data) >= 4 else 0
    if n_entries < 1 or n_entries > len(data) // 12:
        raise ModelError(not_imatrix)
    entries = {}
    for i in range(n_entries):
        length = take("i", f"entry {i + 1}'s name")
        if length < 1 or length > 4096:
            raise ModelError(not_imatrix if i == 0 else f"{path}: entry {i + 1} has a name of {length} bytes; the "
                             "file is damaged")
        if pos + length > len(data):
            raise ModelError(f"{path} ends inside entry {i + 1}'s name; the imatrix file is truncated")
        try:
            name = data[pos: pos + length].decode("utf-8")
        except UnicodeDecodeError:
            raise ModelError(not_imatrix if i == 0 else f"{path}: entry {i + 1}'s name is not text; the file is "
                             "damaged") from None
        pos += length
        ncall, nval = take("ii", f"entry {name}")
        if nval < 1:
            raise ModelError(f"{path}: entry {name} has {nval} values; the file is damaged")
        if pos + 4 * nval > len(data):
            raise ModelError(f"{path} ends inside the values of {name}; the imatrix file is truncated "
                             "(re-download or recompute it)")
        sums = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32).reshape(1, nval)
        pos += 4 * nval
        entries[name] = Entry(sums, np.array([ncall], dtype=np.int64))
    chunk_count, datasets = 0, []
    if pos < len(data):   # the trailing chunk count and dataset name are optional
        chunk_count = take("i", "the chunk count")
        if pos + 4 <= len(data):
            length = take("i", "the dataset name")
            if 0 < length <= len(data) - pos:
                datasets.append(data[pos: pos + length].decode("utf-8", errors="replace"))
    return Imatrix(entries, datasets, chunk_count, 0, [""] * len(datasets), legacy=True)


# ---------------------------------------------------------------------------------------------------- merging


def merge(files: Iterable[Imatrix], chunk_size: int | None = None) -> Imatrix:
    """Several imatrices added as ``llama-imatrix --in-file a --in-file b [-c chunk_size]`` adds them: sums and
    counts add (float32 sums, in the order given); a legacy file's means become sums and counts of ``chunk_size``
    tokens per chunk; a dense count broadcasts over experts. ``chunk_size`` (recorded in the result, and the chunk
    count is the largest count over it): default the first GGUF file's, else 512. Files of other models (other
    tensor widths or expert counts): one-line ModelError."""
    files = list(files)
    if not files:
        raise ModelError("no imatrix files to merge")
    if chunk_size is None:
        chunk_size = next((f.chunk_size for f in files if not f.legacy and f.chunk_size), DEFAULT_CHUNK_SIZE)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    datasets, shas = [], []
    for f in files:
        where = f.path or "an imatrix"
        for name, e in f.entries.items():
            s = e.sums.reshape(-1).astype(np.float32)
            have = sums.get(name)
            if f.legacy:
                if have is None:
                    sums[name] = np.zeros_like(s)
                    counts[name] = np.zeros(1, dtype=np.int64)
                elif have.size != s.size:
                    raise _mismatch(where, name, s.size, have.size)
                sums[name] += s * np.float32(chunk_size)
                counts[name] += int(e.counts[0]) * chunk_size
                continue
            if have is None:
                sums[name] = np.zeros_like(s)
            elif have.size != s.size:
                raise _mismatch(where, name, s.size, have.size)
            c = counts.get(name)
            n = e.counts.size
            if c is None:
                counts[name] = np.zeros(n, dtype=np.int64)
            elif c.size == 1 and n > 1:
                counts[name] = np.full(n, c[0], dtype=np.int64)
            elif c.size != n:
                raise ModelError(f"{where}: {name} has {n} expert counts where the other files have {c.size}; "
                                 "imatrices of different models cannot be merged")
            sums[name] += s
            counts[name] += e.counts
        datasets += f.datasets
        shas += f.sha256 or [""] * len(f.datasets)
    entries = {n: Entry(sums[n].reshape(counts[n].size, -1), counts[n]) for n in sums}   # sizes checked above
    top = max((int(c.max()) for c in counts.values() if c.size), default=0)
    return Imatrix(entries, datasets, top // chunk_size, chunk_size, shas)


def _mismatch(where, name: str, got: int, have: int) -> ModelError:
    return ModelError(f"{where}: {name} has {got} values where the other files have {have}; imatrices of different "
                      "models cannot be merged")


def check_model(imatrix: Imatrix, tensors: dict[str, tuple[int, int]], where: str = "the model") -> None:
    """An imatrix fits a model whose weight matrices are ``tensors`` (GGUF name -> (n_cols, n_expert), n_expert 1 for
    a dense matrix): each entry names one of them and has its width (llama-quantize's size check); one-line
    ModelError otherwise."""
    src = imatrix.path or "the imatrix"
    for name, e in sorted(imatrix.entries.items()):
        if name not in tensors:
            raise ModelError(f"{src} has an entry for {name}, which {where} does not have: it was computed for another "
                             "model; compute one for this model (releaser imatrix)")
        cols, n_expert = tensors[name]
        if e.sums.size != cols * n_expert:
            raise ModelError(f"{src}: {name} has {e.sums.size} values but the tensor in {where} takes {cols * n_expert} "
                             f"({n_expert} x {cols}): it was computed for another model; compute one for this model")


# ---------------------------------------------------------------------------------------------------- writing


def _gguf_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _gguf_bytes(imatrix: Imatrix) -> list[bytes]:
    """The file as llama-imatrix's ``save_imatrix`` writes it (gguf_write_to_file): the keys in its order, then the
    tensors sorted by name, each in_sum2 then counts, data aligned to 32 bytes."""
    kv = [(_gguf_string("general.type") + struct.pack("<I", 8) + _gguf_string("imatrix")),
          (_gguf_string("imatrix.datasets") + struct.pack("<IIQ", 9, 8, len(imatrix.datasets))
           + b"".join(_gguf_string(d) for d in imatrix.datasets)),
          _gguf_string("imatrix.chunk_count") + struct.pack("<II", 4, imatrix.chunk_count),
          _gguf_string("imatrix.chunk_size") + struct.pack("<II", 4, imatrix.chunk_size)]
    if any(imatrix.sha256):
        shas = list(imatrix.sha256) + [""] * (len(imatrix.datasets) - len(imatrix.sha256))
        kv.append(_gguf_string(SHA_KEY) + struct.pack("<IIQ", 9, 8, len(shas)) + b"".join(_gguf_string(s) for s in shas))
    infos, blobs, offset = [], [], 0
    for name in sorted(imatrix.entries, key=lambda n: n.encode("utf-8")):
        e = imatrix.entries[name]
        n_mat = int(e.counts.size)
        if n_mat == 0 or e.sums.size == 0:
            continue
        cols = e.sums.size // n_mat
        for suffix, ne, data in ((".in_sum2", (cols, n_mat), e.sums.astype("<f4").tobytes()),
                                 (".counts", (1, n_mat), e.counts.astype("<f4").tobytes())):
            dims = list(ne)
            while len(dims) > 1 and dims[-1] == 1:   # ggml_n_dims: trailing dimensions of 1 are not written
                dims.pop()
            infos.append(_gguf_string(name + suffix) + struct.pack("<I", len(dims))
                         + b"".join(struct.pack("<q", d) for d in dims) + struct.pack("<IQ", 0, offset))
            pad = -len(data) % ALIGNMENT
            blobs.append(data + b"\0" * pad)
            offset += len(data) + pad
    head = GGUF_MAGIC + struct.pack("<Iqq", 3, len(infos), len(kv)) + b"".join(kv) + b"".join(infos)
    return [head + b"\0" * (-len(head) % ALIGNMENT), *blobs]


def _dat_bytes(imatrix: Imatrix) -> list[bytes]:
    """The legacy format as llama-imatrix's ``save_imatrix_legacy`` writes it: entries without any count left out,
    each value stored as (sum / count) * ncall in float32, ncall = the chunks, rounded up."""
    chunk = imatrix.chunk_size or DEFAULT_CHUNK_SIZE
    parts = []
    names = [n for n in sorted(imatrix.entries, key=lambda n: n.encode("utf-8"))
             if imatrix.entries[n].counts.size and imatrix.entries[n].counts.any()]
    parts.append(struct.pack("<i", len(names)))
    for name in names:
        e = imatrix.entries[name]
        raw = name.encode("utf-8")
        ncall = (int(e.counts.max()) + chunk - 1) // chunk
        sums = e.sums.reshape(e.counts.size, -1).astype(np.float32)
        counts = e.counts.astype(np.float32)[:, None]
        empty = counts == 0
        value = np.where(empty, np.float32(1), sums)
        count = np.where(empty, np.float32(1), counts)
        tmp = ((value / count) * np.float32(ncall)).astype("<f4")
        parts.append(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, tmp.size) + tmp.tobytes())
    dataset = (imatrix.datasets[-1] if imatrix.datasets else "").encode("utf-8")
    parts.append(struct.pack("<ii", imatrix.chunk_count, len(dataset)) + dataset)
    return parts


def write(imatrix: Imatrix, path: str | os.PathLike, *, overwrite: bool = True, legacy: bool | None = None) -> Path:
    """Write ``imatrix`` atomically: GGUF, or the legacy format when ``legacy`` (default: the name ends in .dat)."""
    path = Path(path).absolute()
    if legacy is None:
        legacy = path.suffix.lower() == ".dat"
    parts = _dat_bytes(imatrix) if legacy else _gguf_bytes(imatrix)
    with OutputLock(path):
        check_new(path, overwrite, kind="file")
        sweep(path)
        with temp_file(path) as tmp:
            try:
                with open(tmp, "wb") as fh:
                    for part in parts:
                        fh.write(part)
            except OSError as exc:
                raise os_error(exc, path) from exc
    return path
