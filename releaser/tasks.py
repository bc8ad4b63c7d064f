"""Units of work a stage can hand to an executor: a :class:`Task` names a function by its import path (so it runs in
this process or on another machine alike), its arguments and the :class:`Resources` it needs. A stage that splits
into independent units (the gguf stage: one task per type) takes ``run_tasks``, a function that runs a list of tasks
and returns their :class:`Done` records in the same order; :func:`run_local` (the default) runs them here, one after
the other, with the caller's reporter. ``releaser.pipeline.executor`` runs them on Ray. No Ray import here.

A task with a ``keep`` folder (a release's stage gives its units one, under ``WORK/.units/STAGE/FINGERPRINT``) leaves
its result there (``result.json``, written last and atomically, with the size of every file the unit wrote in the
folder): a release killed after the unit finished takes the result instead of running it again (:func:`kept`), on
any executor, as long as the stage's fingerprint is the same and the unit's files are all there."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .stage import Reporter

MiB = 1 << 20
PROCESS_BYTES = 512 * MiB   # a worker process with numpy, torch and releaser imported (measured RSS ~0.4 GB)


@dataclass(frozen=True)
class Resources:
    """What one task holds while it runs (Ray's num_cpus, memory in bytes and num_gpus). ``gpu_reason`` names the
    option that asked for a GPU (shown when no node has one)."""

    cpus: float = 1.0
    memory: int = 0
    gpus: float = 0.0
    gpu_reason: str = ""


@dataclass(frozen=True)
class Task:
    label: str                   # what it does, shown in progress and recorded in the manifest ("Q4_K_M")
    function: str                # "package.module:function", called as function(*args, reporter=..., **kwargs)
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    resources: Resources = Resources()
    keep: str | None = None      # a folder for its result (see the module doc); None: not kept


@dataclass
class Done:
    label: str
    node: str                    # where it ran ("local", or a Ray node's id and address)
    seconds: float
    value: Any
    kept: bool = False           # taken from the result a run before this one left (not run again)

    def record(self) -> dict:
        """The manifest's line for it."""
        return {"task": self.label, "node": self.node, "seconds": round(self.seconds, 2),
                **({"kept": True} if self.kept else {})}


RunTasks = Callable[[list[Task]], list[Done]]


RESULT = "result.json"


def call(task: Task, reporter: Reporter) -> Any:
    module, name = task.function.split(":")
    value = getattr(importlib.import_module(module), name)(*task.args, reporter=reporter, **task.kwargs)
    if task.keep is not None:
        from .atomic import write_file

        keep = Path(task.keep)
        files = {p.relative_to(keep).as_posix(): p.stat().st_size for p in sorted(keep.rglob("*"))
                 if p.is_file() and p.name != RESULT} if keep.is_dir() else {}
        try:
            text = json.dumps({"value": _encode(value), "files": files}, allow_nan=False)
        except (TypeError, ValueError):   # not JSON (a NaN figure, an object): the unit is not kept
            return value
        write_file(keep / RESULT, text)
    return value


def kept(task: Task) -> Done | None:
    """The result a run before this one left in ``task.keep`` (None: there is none, or a file of it is missing or
    of another size: the unit runs again)."""
    if task.keep is None:
        return None
    keep = Path(task.keep)
    try:
        saved = json.loads((keep / RESULT).read_text())
        if any((keep / name).stat().st_size != size for name, size in saved["files"].items()):
            return None
        return Done(task.label, "kept", 0.0, _decode(saved["value"]), kept=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _encode(value: Any) -> Any:
    """JSON for a unit's result: dicts, lists and scalars as they are, a releaser dataclass by its class and fields."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "__dataclass__" in value:
        module, name = value["__dataclass__"].split(":")
        if module != "releaser" and not module.startswith("releaser."):   # only releaser's own result classes
            raise ValueError(f"not a releaser class: {module}")
        cls = getattr(importlib.import_module(module), name)
        if not dataclasses.is_dataclass(cls):
            raise ValueError(f"not a dataclass: {name}")
        return cls(**{k: _decode(v) for k, v in value["fields"].items()})
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def take_kept(tasks: list[Task], reporter: Reporter, stage: str = "") -> dict[int, Done]:
    """The tasks of ``tasks`` (by index) whose kept result a run before this one left, each shown."""
    found = {}
    for i, task in enumerate(tasks):
        if (done := kept(task)) is not None:
            found[i] = done
            reporter.message(f"{stage}{': ' if stage else ''}{task.label}: kept from the run before")
    return found


def run_local(tasks: list[Task], reporter: Reporter | None = None) -> list[Done]:
    """Run ``tasks`` in this process, in order (the local executor); a kept result is taken, not run again."""
    reporter = reporter or Reporter()
    found = take_kept(tasks, reporter)
    out = []
    for i, task in enumerate(tasks):
        if i in found:
            out.append(found[i])
            continue
        start = time.perf_counter()
        value = call(task, reporter)
        out.append(Done(task.label, "local", time.perf_counter() - start, value))
    return out


def float_bytes(folder: str | Path) -> tuple[int, int]:
    """(all tensors, the largest tensor) of the model folder ``folder`` in float32 bytes, from the shapes in its
    headers (no tensor is read): what the memory estimates of the tasks are made of."""
    from .checkpoint import CheckpointReader

    with CheckpointReader(folder) as reader:
        sizes = [4 * math.prod(t.shape) for t in reader.tensors.values()]
    return sum(sizes), max(sizes, default=0)
