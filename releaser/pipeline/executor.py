"""Where a release's tasks run: :class:`LocalExecutor` (this process, the default; no Ray) or :class:`RayExecutor`
(``--executor ray``: each task a Ray task with its CPUs, memory and GPUs, on any node of a cluster).

The stages are the same for both: a stage that splits into independent units (gguf: one per type; imatrix: one per
batch of chunks; quality: one per artefact) gets ``run_tasks``; the other heavy stages (merge, verify's stop audit,
awq, w4a16, mlx) are one task each; the light ones (tokenizer, verify's doctor, runtimes, cards, publish) run in the
driver. With Ray the driver runs the stages that do not read each other side by side, each in a thread of its own
(``run.py``), so :meth:`RayExecutor.map` is called from several threads at once; :meth:`LocalExecutor.cancel` ends
every stage's tasks when one stage failed. Only the driver writes the manifest; each task writes its output through
:mod:`releaser.atomic` into the work folder, which every node must see at the same path (a shared file system), so a
task Ray runs again after its node died replaces a half-written output with the same bytes. The node and time of
every task go into the manifest (``tasks`` of each stage)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..stage import Reporter
from ..tasks import Done, Task, run_local, take_kept

RETRIES = 3   # how often Ray runs a task again whose worker or node died (not when the task itself raised)


class ExecutorError(ConfigError):
    """The executor cannot run the release (Ray missing or unreachable, a folder the workers cannot see, a task no
    node can take)."""


class Cancelled(Exception):
    """A stage's tasks were cancelled because another stage running beside it failed (that failure is shown)."""


class LocalExecutor:
    """Everything in this process, in order, as releaser always ran."""

    kind = "local"
    node = "local"

    def __init__(self) -> None:
        self.log: dict[str, list[dict]] = {}
        self.cancelled = threading.Event()   # set by the driver when a stage failed: the others end their tasks

    def cancel(self) -> None:
        self.cancelled.set()

    def start(self, work: Path, reporter: Reporter) -> None:
        pass

    def close(self) -> None:
        pass

    @property
    def splits(self) -> bool:
        """Stages split into units (one per GGUF type): only where units can run side by side."""
        return False

    def map(self, stage: str, tasks: list[Task], reporter: Reporter) -> list[Done]:
        done = run_local(tasks, reporter)
        self.log.setdefault(stage, []).extend(d.record() for d in done)
        return done

    def inline(self, stage: str, run: Callable[[], Any]) -> Any:
        """A stage that runs in the driver."""
        start = time.perf_counter()
        value = run()
        self.log.setdefault(stage, []).append(Done(stage, self.node, time.perf_counter() - start, None).record())
        return value


def _remote_call(task: Task) -> tuple[Any, str, float]:
    """What a Ray worker runs: the task with a silent reporter (the driver shows progress), and where it ran."""
    import ray

    from ..tasks import call

    start = time.perf_counter()
    value = call(task, Reporter())
    ctx = ray.get_runtime_context()
    return value, f"{ctx.get_node_id()[:12]}@{ray.util.get_node_ip_address()}", time.perf_counter() - start


def _sees(path: str, token: str) -> tuple[bool, str]:
    """On a node: does ``path`` hold ``token`` (the driver's probe file)?"""
    import socket

    try:
        return Path(path).read_text() == token, socket.gethostname()
    except OSError:
        return False, socket.gethostname()


class RayExecutor(LocalExecutor):
    """Tasks as Ray tasks on the cluster at ``address`` (None: ``RAY_ADDRESS``, or a Ray started on this machine)."""

    kind = "ray"

    def __init__(self, address: str | None = None) -> None:
        super().__init__()
        self.address = address
        self._ours = False   # did this executor start the connection (then it ends it)
        self.node = "driver"

    @property
    def splits(self) -> bool:
        return True

    def _ray(self):
        try:
            import ray
        except ImportError:
            raise ExecutorError("--executor ray needs Ray: pip install 'releaser[ray]' (or run without --executor "
                                "ray)") from None
        return ray

    def start(self, work: Path, reporter: Reporter) -> None:
        ray = self._ray()
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, logging_level="ERROR", log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ExecutorError(f"cannot connect to the Ray cluster at {self.address or 'RAY_ADDRESS'}: "
                                    f"{str(exc).splitlines()[0]}; start it (ray start --head) or give "
                                    "--ray-address") from None
            self._ours = True
        ctx = ray.get_runtime_context()
        self.node = f"{ctx.get_node_id()[:12]}@{ray.util.get_node_ip_address()} (driver)"
        nodes = [n for n in ray.nodes() if n["Alive"]]
        reporter.message(f"ray: {len(nodes)} node(s), {ray.cluster_resources().get('CPU', 0):g} CPUs, "
                         f"{ray.cluster_resources().get('GPU', 0):g} GPUs")
        self.check_shared(Path(work), nodes)

    def check_shared(self, work: Path, nodes: list[dict], *, probe: bool = True) -> None:
        """Every node must see the work folder at the same path: a probe file the driver writes is read back on each
        node (``probe`` False: not written, the test's way to show the refusal)."""
        ray = self._ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from ..atomic import write_file

        token = os.urandom(16).hex()
        path = work / f".releaser-probe-{token[:8]}"
        work.mkdir(parents=True, exist_ok=True)
        if probe:
            write_file(path, token)
        try:
            sees = ray.remote(_sees)
            refs = [sees.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                    .remote(str(path), token) for n in nodes]
            for node, ref in zip(nodes, refs):
                try:
                    ok, host = ray.get(ref, timeout=120)
                except ray.exceptions.GetTimeoutError:
                    raise ExecutorError(f"Ray node {node['NodeID'][:12]} ({node['NodeManagerAddress']}) did not answer "
                                        "in 120 s; check the cluster (ray status)") from None
                if not ok:
                    raise ExecutorError(f"Ray node {node['NodeID'][:12]} ({host}, {node['NodeManagerAddress']}) cannot "
                                        f"see the work folder {work}: it must be on a file system every node mounts "
                                        "at the same path (NFS, a cluster file system); choose such a folder with -o")
        finally:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._ours:
            self._ray().shutdown()
            self._ours = False

    def _feasible(self, stage: str, task: Task) -> None:
        """A task that no node can take fails now, with one line, instead of waiting for a node forever."""
        ray = self._ray()
        r = task.resources
        have = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        if r.gpus and not any(h.get("GPU", 0) >= r.gpus for h in have):
            raise ExecutorError(f"{stage}: {task.label} needs a GPU ({r.gpu_reason or 'device cuda'}) and no node of "
                                "the Ray cluster has one; add a GPU node or set the device to cpu")
        if not any(h.get("CPU", 0) >= r.cpus and h.get("memory", 0) >= r.memory and h.get("GPU", 0) >= r.gpus
                   for h in have):
            most = max((h.get("memory", 0) for h in have), default=0)
            raise ExecutorError(f"{stage}: {task.label} needs {r.cpus:g} CPU(s) and {r.memory / 2**30:.1f} GiB of "
                                f"memory on one node, and no node of the Ray cluster has that (the largest has "
                                f"{most / 2**30:.1f} GiB); add a larger node")

    def map(self, stage: str, tasks: list[Task], reporter: Reporter) -> list[Done]:
        """Run ``tasks`` on the cluster (called from the stage's driver thread; several stages at once): their
        :class:`Done` records in order; the first task's error ends the others; :meth:`cancel` ends them all
        (:class:`Cancelled`)."""
        ray = self._ray()
        if self.cancelled.is_set():
            raise Cancelled(stage)
        results = take_kept(tasks, reporter, stage)   # a unit a killed run finished is taken, not sent
        for task in (t for i, t in enumerate(tasks) if i not in results):
            self._feasible(stage, task)
        remote = ray.remote(_remote_call)
        refs = {}
        for i, task in enumerate(tasks):
            if i in results:
                continue
            r = task.resources
            refs[remote.options(num_cpus=r.cpus, memory=int(r.memory) or None, num_gpus=r.gpus or None,
                                max_retries=RETRIES, retry_exceptions=False,
                                name=f"releaser {stage} {task.label}").remote(task)] = i, task
        pending = list(refs)
        with reporter.progress(f"{stage}: {len(refs)} Ray task(s)", len(refs)) as advance:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=0.2)
                if self.cancelled.is_set():
                    for ref in pending + ready:
                        ray.cancel(ref, force=True)
                    raise Cancelled(stage)
                if not ready:
                    continue
                i, task = refs[ready[0]]
                try:
                    value, node, seconds = ray.get(ready[0])
                except ray.exceptions.RayTaskError as exc:   # the task raised: its own error, one line
                    for ref in pending:
                        ray.cancel(ref, force=True)
                    cause = exc.cause
                    raise cause if isinstance(cause, BaseException) else ExecutorError(str(exc)) from None
                except ray.exceptions.RayError as exc:   # retries used up (nodes lost), or the cluster went away
                    for ref in pending:
                        ray.cancel(ref, force=True)
                    raise ExecutorError(f"{stage}: {task.label} failed on Ray after {RETRIES} retries: "
                                        f"{str(exc).splitlines()[0]}") from None
                results[i] = Done(task.label, node, seconds, value)
                reporter.message(f"{stage}: {task.label} done on {node} in {seconds:.1f} s")
                advance(1, description=f"{stage}: {task.label}")
        done = [results[i] for i in range(len(tasks))]
        self.log.setdefault(stage, []).extend(d.record() for d in done)
        return done


def make_executor(kind: str | None, address: str | None) -> LocalExecutor:
    if address is not None and kind not in (None, "ray"):
        raise ExecutorError("--ray-address is for --executor ray; add --executor ray or drop the address")
    if kind == "ray" or address is not None:
        return RayExecutor(address)
    if kind not in (None, "local"):
        raise ExecutorError(f"unknown executor {kind!r}; use local or ray")
    return LocalExecutor()
