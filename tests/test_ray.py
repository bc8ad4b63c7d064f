"""``releaser release --executor ray`` on a real Ray: a cluster of a head (no CPUs: the driver's node) and two worker
nodes of one CPU each, on this machine (``ray.cluster_utils.Cluster``, started once for the module). A small release
(a merge of two tiny models, an importance matrix of three batches of chunks, three GGUF types made with it, quality)
made on it has the bytes of the in-process run's; its tasks ran on both workers (the manifest says where), the
importance matrix's batches too; a worker node removed while it makes a GGUF type is survived (Ray runs the
task again elsewhere); a driver killed during the GGUF fan-out resumes from the manifest; a task that needs a GPU in a
cluster without one, a work folder a node cannot see and a missing Ray are one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import require
from release_helpers import ROOT, cli, hashes, tiny_merge_recipe

TYPES = ["Q8_0", "Q4_K_M", "Q6_K"]
# the importance matrix in batches of PASS_TOKENS // ctx = 4 chunks: three Ray tasks (4, 4 and 2 chunks)
GGUF = (f"gguf: {{quants: [{', '.join(TYPES)}], pre_tokenizer: llama-bpe, imatrix: auto}}\n"
        "imatrix: {ctx: 1024, chunks: 10}\n")
PLAIN_GGUF = f"gguf: {{quants: [{', '.join(TYPES)}], pre_tokenizer: llama-bpe}}\n"   # no imatrix: starts at once
STORE = 80 * 1024 ** 2   # object store per node: the tasks pass small results only


@pytest.fixture(scope="module")
def cluster():
    ray = require("ray")
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": STORE})
    for _ in range(2):
        c.add_node(num_cpus=1, object_store_memory=STORE)
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    from releaser_testing import tiny_chat_model

    root = tmp_path_factory.mktemp("ray-inputs")
    for i, name in enumerate("ab"):
        tiny_chat_model(root / name, arch="llama", seed=i, hidden=256, intermediate=512, layers=4)
    return root


def recipe(root: Path, inputs: Path, extra: str = "") -> Path:
    return tiny_merge_recipe(root, inputs, "Tiny-Ray", GGUF, extra)


@pytest.fixture(scope="module")
def local(tmp_path_factory, inputs) -> Path:
    """The in-process release (the default executor): the bytes every Ray run must give."""
    from releaser.pipeline.run import run_release

    root = tmp_path_factory.mktemp("ray-local")
    run_release(recipe(root, inputs), root / "work")
    return root / "work"


def _tasks(work: Path) -> dict[str, list[dict]]:
    stages = json.loads((work / "release.json").read_text())["stages"]
    return {name: entry["tasks"] for name, entry in stages.items()}


def test_ray_release_has_the_local_bytes_and_ran_on_both_workers(cluster, local, inputs, tmp_path):
    proc = cli("release", recipe(tmp_path, inputs), "-o", tmp_path / "work", "--executor", "ray", "--ray-address",
               cluster.address, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert hashes(tmp_path / "work") == hashes(local)
    tasks = _tasks(tmp_path / "work")
    gguf = {t["task"]: t["node"] for t in tasks["gguf"] if t["task"] in TYPES}
    assert sorted(gguf) == sorted(TYPES)
    workers = {t["node"] for stage in tasks.values() for t in stage if "(driver)" not in t["node"]}
    assert len(workers) == 2, tasks   # both worker nodes took tasks
    assert all(t["node"].endswith("(driver)") for t in tasks["cards"] + tasks["publish"])
    assert "gguf: Q4_K_M done on" in proc.stdout + proc.stderr   # the CLI shows each task's node as it ends
    imatrix = {t["task"]: t["node"] for t in tasks["imatrix"] if t["task"] != "imatrix"}   # the stage: the driver
    # one task per batch of chunks, on both workers
    assert list(imatrix) == ["chunks 1-4", "chunks 5-8", "chunks 9-10"] and len(set(imatrix.values())) == 2, imatrix
    assert [p.name for p in (tmp_path / "work" / "imatrix").iterdir()] == ["Tiny-Ray-imatrix.gguf"]   # no parts left


def _raylet_pid(node) -> int:
    return node.all_processes["raylet"][0].process.pid


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


def _gguf_task(work: Path, stop: threading.Event) -> tuple[int, Path] | None:
    """The pid of a Ray worker holding a GGUF type's output lock (a unit in progress), as soon as there is one, and
    the lock."""
    while not stop.is_set():
        for lock in work.glob(".units/gguf/*/*/.out.releaser-lock"):
            try:
                return int(lock.read_text().strip()), lock
            except (OSError, ValueError):
                pass
        time.sleep(0.01)
    return None


def test_a_worker_node_removed_during_the_gguf_fan_out_is_survived(cluster, local, inputs, tmp_path):
    """The node running a GGUF type is removed mid-task (its raylet and workers killed): Ray runs the task again on
    the other node; the release ends with the local bytes and the manifest has that type made on another node."""
    from releaser.pipeline.run import run_release

    work = tmp_path / "work"
    outcome: dict = {}

    def release() -> None:
        try:
            outcome["result"] = run_release(recipe(tmp_path, inputs), work, executor="ray",
                                            ray_address=cluster.address)
        except BaseException as exc:   # noqa: BLE001 - checked below
            outcome["error"] = exc

    thread = threading.Thread(target=release)
    thread.start()
    stop = threading.Event()
    timer = threading.Timer(300, stop.set)
    timer.start()
    try:
        while True:
            found = _gguf_task(work, stop)
            assert found is not None, "no GGUF type was in progress"
            pid, lock = found
            raylets = {_raylet_pid(n): n for n in cluster.worker_nodes}
            try:
                node = raylets[_ppid(pid)]
            except OSError:   # that task just ended: take the next one
                continue
            if lock.exists():   # still in progress (its lock goes when it ends)
                break
        removed, running = node.node_id[:12], lock.parent.name
        os.kill(pid, signal.SIGKILL)   # the node dies with its processes: the task cannot end there (a warm worker's
        cluster.remove_node(node, allow_graceful=False)   # type can end within the raylet's last moments otherwise)
    finally:
        timer.cancel()
        stop.set()
        thread.join(timeout=600)
        cluster.add_node(num_cpus=1, object_store_memory=STORE)   # the next tests have two workers again
        cluster.wait_for_nodes()
    assert "error" not in outcome, outcome.get("error")
    assert hashes(work) == hashes(local)
    gguf = {t["task"]: t["node"].split("@")[0] for t in _tasks(work)["gguf"] if t["task"] in TYPES}
    assert sorted(gguf) == sorted(TYPES) and gguf[running] != removed, (removed, running, gguf)


def _unit_done(work: Path, stop: threading.Event) -> bool:
    """Wait until a GGUF type's unit has finished (its kept result is there)."""
    while not stop.is_set():
        if any(work.glob(".units/gguf/*/*/result.json")):
            return True
        time.sleep(0.01)
    return False


def test_a_killed_driver_resumes_from_the_manifest(cluster, local, inputs, tmp_path):
    """``releaser release --executor ray`` killed (SIGKILL) once a GGUF type is made and while the others are being
    made: the next run (local here, as a user might) keeps the stages the manifest records and the types finished
    before the kill, and ends with the local bytes."""
    path, work = recipe(tmp_path, inputs), tmp_path / "work"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "releaser.cli", "release", str(path), "-o", str(work), "--executor",
                             "ray", "--ray-address", cluster.address, "-q"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stop = threading.Event()
    timer = threading.Timer(300, stop.set)
    timer.start()
    try:
        assert _unit_done(work, stop), "no GGUF type was made"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
    recorded = set(json.loads((work / "release.json").read_text())["stages"])
    assert {"merge", "tokenizer"} <= recorded and "gguf" not in recorded
    finished = {p.parent.name for p in work.glob(".units/gguf/*/*/result.json")}
    assert finished and finished < set(TYPES), finished
    again = cli("release", path, "-o", work)
    assert again.returncode == 0, again.stdout + again.stderr
    assert hashes(work) == hashes(local)
    stages = json.loads((work / "release.json").read_text())["stages"]
    assert stages["merge"]["executor"] == "ray" and stages["gguf"]["executor"] == "local"
    for name in finished:   # taken, not made again
        assert f"{name}: kept from the run before" in again.stdout + again.stderr
    assert not (work / ".units").exists()   # gone once the stages recorded their outputs


def test_stages_that_do_not_read_each_other_overlap(cluster, inputs, tmp_path):
    """After the tokenizer, the GGUF types and AWQ are on the cluster at once: the manifest's start and end times of
    the two stages overlap (in order, AWQ would start after the runtimes stage that follows gguf)."""
    path = recipe(tmp_path, inputs, "awq: {samples: 4, seqlen: 64}\n")
    path.write_text(path.read_text().replace(GGUF, PLAIN_GGUF)
                    .replace("quality: {ctx: 64, chunks: 2, stop_test: false}\n", "quality: false\n"))
    from releaser.pipeline.run import run_release
    from releaser.pipeline.stages import NAMES

    result = run_release(path, tmp_path / "work", executor="ray", ray_address=cluster.address)
    assert [s.name for s in result.stages] == NAMES   # the rows in stage order, whatever order they ended in
    stages = json.loads((tmp_path / "work" / "release.json").read_text())["stages"]
    gguf, awq = stages["gguf"], stages["awq"]
    assert awq["started"] < gguf["finished"] and gguf["started"] < awq["finished"], (gguf, awq)
    assert stages["tokenizer"]["finished"] <= min(gguf["started"], awq["started"])
    assert stages["cards"]["started"] >= max(gguf["finished"], awq["finished"], stages["runtimes"]["finished"])


def test_a_gpu_task_in_a_cluster_without_gpus_fails_at_once(cluster, inputs, tmp_path):
    """AWQ fails (no GPU) while the GGUF types it runs beside are on the cluster: its one line is the error, the
    GGUF tasks are cancelled (not recorded) and nothing waits."""
    path = recipe(tmp_path, inputs, "awq: {samples: 8, seqlen: 64, device: cuda}\n")
    path.write_text(path.read_text().replace(GGUF, PLAIN_GGUF)
                    .replace("quality: {ctx: 64, chunks: 2, stop_test: false}\n", "quality: false\n"))
    start = time.perf_counter()
    proc = cli("release", path, "-o", tmp_path / "work", "--executor", "ray", "--ray-address", cluster.address,
               "-q", timeout=300)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stdout + proc.stderr
    assert "awq: awq needs a GPU (awq.device cuda) and no node of the Ray cluster has one" in errors[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert time.perf_counter() - start < 120
    stages = json.loads((tmp_path / "work" / "release.json").read_text())["stages"]
    assert {"merge", "tokenizer"} <= set(stages) and not {"gguf", "awq"} & set(stages), sorted(stages)


def test_a_task_larger_than_every_node_fails_at_once(cluster):
    from releaser.pipeline.executor import ExecutorError, RayExecutor
    from releaser.stage import Reporter
    from releaser.tasks import Resources, Task

    task = Task("Q4_K_M", "releaser.gguf.stage:export_types", resources=Resources(cpus=1, memory=2 ** 50))
    with pytest.raises(ExecutorError, match=r"^gguf: Q4_K_M needs 1 CPU\(s\) and 1048576.0 GiB of memory on one node, "
                                            r"and no node of the Ray cluster has that \(the largest has [\d.]+ GiB\); "
                                            "add a larger node$"):
        RayExecutor(cluster.address).map("gguf", [task], Reporter())


def test_a_work_folder_a_node_cannot_see_is_refused(cluster, tmp_path):
    """The probe file the driver writes is what every node must read back; not written (as a node with its own,
    unshared folder at that path would see it): the one-line refusal names the node and the fix."""
    import ray

    from releaser.pipeline.executor import ExecutorError, RayExecutor

    nodes = [n for n in ray.nodes() if n["Alive"]]
    with pytest.raises(ExecutorError, match=r"^Ray node \w+ \(.*\) cannot see the work folder .*: it must be on a file "
                                            r"system every node mounts at the same path"):
        RayExecutor(cluster.address).check_shared(tmp_path, nodes, probe=False)
    RayExecutor(cluster.address).check_shared(tmp_path, nodes)   # written: every node reads it
    assert not list(tmp_path.iterdir())   # the probe is removed


def test_an_error_in_a_task_is_its_own_one_line_error(cluster, tmp_path):
    """A task that raises (a releaser error on the worker) is not retried and reaches the driver as that error, not
    as Ray's wrapper with a remote traceback."""
    from releaser.errors import ReleaserError
    from releaser.pipeline.executor import RayExecutor
    from releaser.quality.options import QualityOptions
    from releaser.stage import Reporter
    from releaser.tasks import Task

    missing = tmp_path / "missing.gguf"
    task = Task("missing.gguf", "releaser.quality.stage:measure_unit", (QualityOptions(), str(missing), {}, None,
                                                                         None, 0.0))
    with pytest.raises(ReleaserError) as info:
        RayExecutor(cluster.address).map("quality", [task], Reporter())
    assert str(missing) in str(info.value) and "\n" not in str(info.value) and "Ray" not in type(info.value).__name__


def test_ray_missing_is_one_line(monkeypatch, tmp_path):
    from releaser.pipeline.executor import ExecutorError, make_executor
    from releaser.stage import Reporter

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ExecutorError, match=r"--executor ray needs Ray: pip install 'releaser\[ray\]'"):
        make_executor("ray", None).start(tmp_path, Reporter())
    with pytest.raises(ExecutorError, match="--ray-address is for --executor ray"):
        make_executor("local", "127.0.0.1:6379")
