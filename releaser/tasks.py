"""Units of work a stage can hand to an executor: a :class:`Task` names a function by its import path (so it runs in
this process or on another machine alike), its arguments and the :class:`Resources` it needs. A stage that splits
into independent units (the gguf stage: one task per type) takes ``run_tasks``, a function that runs a list of tasks
and returns their :class:`Done` records in the same order; :func:`run_local` (the default) runs them here, one after
the other, with the caller's reporter. ``releaser.pipeline.executor`` runs them on Ray. No Ray import here."""

from __future__ import annotations

import importlib
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


@dataclass
class Done:
    label: str
    node: str                    # where it ran ("local", or a Ray node's id and address)
    seconds: float
    value: Any

    def record(self) -> dict:
        """The manifest's line for it."""
        return {"task": self.label, "node": self.node, "seconds": round(self.seconds, 2)}


RunTasks = Callable[[list[Task]], list[Done]]


def call(task: Task, reporter: Reporter) -> Any:
    module, name = task.function.split(":")
    return getattr(importlib.import_module(module), name)(*task.args, reporter=reporter, **task.kwargs)


def run_local(tasks: list[Task], reporter: Reporter | None = None) -> list[Done]:
    """Run ``tasks`` in this process, in order (the local executor)."""
    reporter = reporter or Reporter()
    out = []
    for task in tasks:
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
