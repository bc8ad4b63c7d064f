"""Lazy reader for Hugging Face model folders: safetensors (single or sharded) and ``pytorch_model*.bin``."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch

from ..errors import ModelError
from . import safetensors_io as st
from .config import read_config
from .safetensors_io import TensorInfo


def check_folder(folder: Path, hint: str = "check the path") -> None:
    """A one-line ModelError unless ``folder`` is an existing folder (a file is named as such)."""
    if folder.is_dir():
        return
    if folder.exists():
        raise ModelError(f"model path {folder} is a file, not a model folder; give the folder that holds config.json")
    raise ModelError(f"model folder {folder} does not exist; {hint}")


def _weight_files(folder: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise ModelError(f"{folder / index} is not a valid weight index ({exc}); re-download the model") from exc
            files = [folder / f for f in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ModelError(f"{folder} is missing shard {missing[0]} listed in {index}; re-download the model")
            return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    return sorted(folder.glob("pytorch_model*.bin"))


class CheckpointReader:
    """Read single tensors of a model folder on demand, without loading the model.

    ``reader.tensors`` maps names to :class:`TensorInfo` (dtype, shape, file); ``reader.read(name)`` returns a new tensor.
    ``read`` is safe to call from several threads.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        check_folder(self.folder, "check the path in your config")
        files = _weight_files(self.folder)
        if not files:
            raise ModelError(f"{self.folder} has no weights (expected model.safetensors, sharded "
                             "model-*.safetensors with an index, or pytorch_model*.bin)")
        self.config = read_config(self.folder)
        self.tensors: dict[str, TensorInfo] = {}
        self._bins: dict[str, dict[str, torch.Tensor]] = {}
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        for f in files:
            if f.suffix == ".safetensors":
                try:
                    infos = st.list_tensors(str(f))
                except (OSError, ValueError, KeyError) as exc:
                    raise ModelError(f"{f} is not a valid safetensors file ({exc}); re-download the model") from exc
            else:
                infos = self._list_bin(f)
            for info in infos:
                self.tensors[info.name] = info

    def _list_bin(self, path: Path) -> list[TensorInfo]:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises many types for a bad or unsafe pickle
            raise ModelError(f"{path} cannot be loaded safely ({type(exc).__name__}); convert it to safetensors") from exc
        self._bins[str(path)] = state
        return [TensorInfo(k, v.dtype, tuple(v.shape), str(path)) for k, v in state.items()]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        if info.file in self._bins:
            return self._bins[info.file][name].clone()
        return st.read_tensor(self._fd(info.file), info)

    def map(self, name: str) -> torch.Tensor:
        """Like :meth:`read`, for a tensor used briefly: a private copy-on-write mapping of the file (safetensors), so
        the bytes are not copied and no fresh memory is touched. Writing to it never changes the file. Hold few at a
        time: each is a mapping of its own, alive as long as the tensor."""
        info = self.tensors[name]
        if info.file in self._bins:
            return self._bins[info.file][name].clone()
        return st.map_tensor(self._fd(info.file), info)

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            with self._lock:
                fd = self._fds.get(file)
                if fd is None:
                    fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return fd

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._bins.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
