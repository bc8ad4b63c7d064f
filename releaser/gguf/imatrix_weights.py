"""An importance matrix as llama-quantize uses it: ``load_imatrix`` (``tools/quantize/quantize.cpp``'s load_imatrix
over ``common/imatrix-loader.cpp``) and, per tensor, the weight rows ``llama_model_quantize`` passes to the
quantizers (``src/llama-quant.cpp``), with the ``quantize.imatrix.*`` keys llama-quantize writes."""

from __future__ import annotations

import os
from dataclasses import dataclass

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
    """Read a llama.cpp importance matrix (GGUF, or the legacy ``.dat``; :func:`releaser.imatrix.file.read`) into the
    weights llama-quantize uses: GGUF ``in_sum2`` / ``counts`` per expert (a count of 0 gives weights of 1); legacy
    sums / ncall."""
    from ..errors import ModelError
    from ..imatrix.file import read

    try:
        matrix = read(path)
    except ModelError as exc:
        raise ImatrixError(f"{path} is not a readable imatrix file: {exc}") from None
    entries = matrix.importance()
    for name, w in entries.items():
        if not np.isfinite(w).all():
            raise ImatrixError(f"imatrix {path}: the entry for {name} contains non-finite values; compute it again")
    return Imatrix(os.fspath(path), entries, matrix.datasets, matrix.chunk_count)
