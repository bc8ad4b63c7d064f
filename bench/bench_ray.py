"""Benchmark `releaser release --executor ray` against the in-process run of the same recipe: whole-process wall time
and peak memory, on a local two-node Ray cluster (``ray.cluster_utils.Cluster``: a head and one worker node of one CPU
each, started before the timed run, as a user's cluster would be up already).

    python bench/bench_ray.py [--recipe demo|small] [--work DIR]

``demo``: recipes/demo.yaml (README's first command; 10-18 minutes a run on 2 cores). ``small``: the merge of two
random 4-layer models (hidden 512) with three GGUF types and quality, as tests/test_ray.py runs (a minute).

Memory: the release process's peak RSS (/usr/bin/time -v), and the peak of the summed RSS of every process of the run
(sampled every 0.2 s): the release process and its children; with Ray also the cluster's processes (GCS, raylets,
workers), whose idle RSS before the run is shown apart. The artefacts of both runs are compared byte for byte.
Target: the Ray run's wall time <= 1.2x the in-process run's. Each stage's and task's seconds come from the manifest
(the README's on-paper 70B figures are made from them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # releaser_testing: the repo's fixtures (not installed)

ROOT = Path(__file__).resolve().parents[1]
STORE = 80 * 1024 ** 2


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree_rss(root: int, exclude: int | None = None) -> int:
    """Summed RSS of ``root``'s descendants (not ``root`` itself, nor ``exclude``'s subtree)."""
    kids = _children()
    total, todo = 0, list(kids.get(root, []))
    while todo:
        pid = todo.pop()
        if pid == exclude:
            continue
        total += _rss(pid)
        todo.extend(kids.get(pid, []))
    return total


def timed(cmd: list[str]) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; the peak summed RSS of every process this bench started meanwhile."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss(os.getpid()))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, cwd=ROOT)
    finally:
        stop.set()
        sampler.join()
    if proc.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    h, m, s = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr).groups()
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) * 1024
    return {"wall_s": (int(h or 0) * 60 + int(m)) * 60 + float(s), "rss": rss, "tree": peak[0]}


def small_recipe(root: Path) -> Path:
    from releaser_testing import tiny_chat_model

    for i, name in enumerate("ab"):
        if not (root / name).is_dir():
            tiny_chat_model(root / name, arch="llama", seed=i, hidden=512, intermediate=1408, layers=4)
    path = root / "small.yaml"
    path.write_text(f"""name: bench/Small-Ray
description: A small release for the Ray benchmark.
stop_audit: false
merge:
  merge_method: linear
  dtype: float32
  models:
    - {{model: {root / 'a'}, parameters: {{weight: 0.6}}}}
    - {{model: {root / 'b'}, parameters: {{weight: 0.4}}}}
tokenizer: {{template: chatml}}
gguf: {{quants: [Q8_0, Q4_K_M, Q6_K, Q5_K_M], pre_tokenizer: llama-bpe}}
quality: {{ctx: 128, chunks: 4, stop_test: false}}
""")
    return path


def demo_recipe(root: Path) -> Path:
    from releaser_testing import demo_inputs

    demo_inputs(root / "demo")
    shutil.copytree(ROOT / "recipes", root / "recipes", dirs_exist_ok=True)
    return root / "recipes" / "demo.yaml"


def hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "release.json"}


def tasks_line(work: Path) -> str:
    """Each stage's seconds (and its units'), and with ``started`` in the manifest when it started after the first
    stage did (``+12.3``): stages that overlapped under Ray show it."""
    import datetime as dt

    from releaser.pipeline.stages import NAMES

    stages = json.loads((work / "release.json").read_text())["stages"]
    starts = {n: dt.datetime.fromisoformat(e["started"]) for n, e in stages.items() if "started" in e}
    first = min(starts.values(), default=None)
    parts = []
    for name, entry in sorted(stages.items(), key=lambda kv: NAMES.index(kv[0])):
        units = [t for t in entry.get("tasks", []) if t["task"] != name]
        inner = (" [" + ", ".join(f"{t['task']} {t['seconds']:.1f} s on {t['node'].split('@')[0][:6]}"
                                  for t in units) + "]") if units else ""
        at = f" at +{(starts[name] - first).total_seconds():.1f}" if name in starts else ""
        parts.append(f"{name} {entry['seconds']:.1f} s{at}{inner}")
    return "; ".join(parts)


FIXED = ("tokenizer", "runtimes", "cards", "publish")   # copies and small files: not scaled with the model's size


def on_paper(root: Path, params: float = 70e9, types: int = 12, nodes: int = 8) -> None:
    """The 70B release on paper, from the measured times of the bench's two runs (``root/local``, ``root/ray``):
    every stage's time but the light ones scaled by the parameter ratio (an assumption: the work of merge, GGUF, AWQ,
    quality and the stop audit grows with the parameters, at a fixed calibration and evaluation text), ``types`` GGUF
    types each as long as the mean measured type, the quality measurement of each as long as the mean measured GGUF
    measurement; one node in-process against ``nodes`` CPU nodes and a GPU node on Ray (units of a stage side by side,
    and stages that do not read each other side by side: the total is the graph's longest path)."""
    from releaser.tasks import float_bytes

    local = json.loads((root / "local" / "release.json").read_text())["stages"]
    ray_ = json.loads((root / "ray" / "release.json").read_text())["stages"]
    main = next(p for p in (root / "local").iterdir() if p.is_dir() and (p / "config.json").is_file()
                and p.name != "merged" and not p.name.endswith(("-AWQ", "-W4A16", "-MLX-4bit")))
    estimate(local, ray_, params / (float_bytes(main)[0] / 4), params, types, nodes)


def estimate(local: dict, ray_: dict, scale: float, params: float = 70e9, types: int = 12, nodes: int = 8) -> None:
    """:func:`on_paper` from the two runs' manifest stages and the parameter ratio ``scale``."""
    units = {name: [t for t in e.get("tasks", []) if t["task"] != name] for name, e in ray_.items()}
    gguf = [t["seconds"] for t in units.get("gguf", [])]
    q = {t["task"]: t["seconds"] for t in units.get("quality", [])}
    q_gguf = [v for k, v in q.items() if k.endswith(".gguf") and not k.startswith("stop test")]
    q_base = q.get("unquantized model", 0)
    q_stop = max((v for k, v in q.items() if k.startswith("stop test")), default=0)
    q_folders = [v for k, v in q.items() if not k.endswith(".gguf") and k != "unquantized model"
                 and not k.startswith("stop test")]   # the AWQ, W4A16 and MLX folders
    per_type, per_meas = sum(gguf) / len(gguf), sum(q_gguf) / len(q_gguf)
    print(f"on paper: {params / 1e9:.0f}B parameters = {scale:.0f}x the measured model; {types} GGUF types at the "
          f"mean measured type's {per_type:.1f} s, each measured in the mean {per_meas:.1f} s; the AWQ task at its "
          "CPU time (no GPU here: an upper bound for the GPU node); each task's fixed costs (a worker's imports) are "
          "scaled too: upper bounds")
    one, rows = 0.0, {}
    from releaser.pipeline.stages import AFTER, NAMES

    for name, entry in sorted(local.items(), key=lambda kv: NAMES.index(kv[0])):
        if name == "gguf":   # one pass for all types in process; ceil(types / nodes) waves of one type each on Ray
            one_s, many_s = types * per_type * scale, -(-types // nodes) * per_type * scale
        elif name == "quality":   # stop test and base pass side by side, then waves of measurements on every node
            count = types + len(q_folders)
            one_s = (q_stop + q_base + types * per_meas + sum(q_folders)) * scale
            many_s = (max(q_stop, q_base) + -(-count // (nodes + 1)) * max([per_meas, *q_folders])) * scale
        else:
            one_s = many_s = entry["seconds"] if name in FIXED else entry["seconds"] * scale
        one += one_s
        rows[name] = many_s
        print(f"  {name:9s} one node {one_s / 3600:6.2f} h   {nodes} CPU + 1 GPU nodes {many_s / 3600:6.2f} h")
    # the cluster's time: the longest path through the stages' prerequisites (a stage starts when they have ended)
    ends, via = {}, {}
    for name in NAMES:
        before = max((p for p in AFTER[name] if p in ends), key=lambda p: ends[p], default=None)
        ends[name] = (ends[before] if before else 0.0) + rows.get(name, 0.0)
        via[name] = before
    last = max(ends, key=ends.get)
    path = []
    while last is not None:
        path.append(last)
        last = via[last]
    critical = ", ".join(f"{n} {rows[n] / 3600:.1f} h" for n in reversed(path) if rows.get(n, 0) >= 360)
    print(f"  total: one node {one / 3600:.1f} h, {nodes} CPU nodes + 1 GPU node {max(ends.values()) / 3600:.1f} h "
          f"(stages side by side where they do not read each other; the critical path: {critical})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", choices=("demo", "small"), default="demo")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--on-paper", action="store_true", help="only the 70B estimate from an earlier run in --work")
    args = ap.parse_args()
    if args.on_paper:
        on_paper(args.work)
        return
    root = args.work or Path(tempfile.mkdtemp(prefix="bench-ray-"))
    root.mkdir(parents=True, exist_ok=True)
    recipe = demo_recipe(root) if args.recipe == "demo" else small_recipe(root)
    base = [sys.executable, "-m", "releaser.cli", "release", str(recipe), "--quiet"]
    load = os.getloadavg()[0]

    shutil.rmtree(root / "local", ignore_errors=True)
    local = timed([*base, "-o", str(root / "local")])

    import ray
    from ray.cluster_utils import Cluster

    start = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": STORE})
    cluster.add_node(num_cpus=1, object_store_memory=STORE)
    cluster.wait_for_nodes()
    up = time.perf_counter() - start
    idle = tree_rss(os.getpid())
    try:
        shutil.rmtree(root / "ray", ignore_errors=True)
        on_ray = timed([*base, "-o", str(root / "ray"), "--executor", "ray", "--ray-address", cluster.address])
    finally:
        ray.shutdown()
        cluster.shutdown()
    same = hashes(root / "local") == hashes(root / "ray")

    print(f"releaser release {recipe.name} (load average {load:.1f} before, {os.cpu_count()} cores)")
    print(f"  in-process: wall {local['wall_s']:.1f} s, peak RSS {local['rss'] / 1e9:.2f} GB (all processes "
          f"{local['tree'] / 1e9:.2f} GB)")
    print(f"    {tasks_line(root / 'local')}")
    print(f"  ray, 2 nodes of 1 CPU (cluster up in {up:.1f} s, idle {idle / 1e9:.2f} GB, not in the run's time): wall "
          f"{on_ray['wall_s']:.1f} s ({on_ray['wall_s'] / local['wall_s']:.2f}x; target <= 1.2x), driver peak RSS "
          f"{on_ray['rss'] / 1e9:.2f} GB, all processes (cluster included) {on_ray['tree'] / 1e9:.2f} GB")
    print(f"    {tasks_line(root / 'ray')}")
    print(f"  artefacts byte-identical: {same}")
    on_paper(root)


if __name__ == "__main__":
    main()
