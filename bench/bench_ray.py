"""Benchmark `releaser release --executor ray` against the in-process run of the same recipe: whole-process wall time
and peak memory, on a local two-node Ray cluster (``ray.cluster_utils.Cluster``: a head and one worker node of one CPU
each, started before the timed run, as a user's cluster would be up already).

    python bench/bench_ray.py [--recipe demo|small|large] [--work DIR] [--ray-only]
    python bench/bench_ray.py --on-paper DEMO_WORK LARGE_WORK    # the 70B release on paper from two runs

``demo``: recipes/demo.yaml (README's first command; 10-18 minutes a run on 2 cores). ``small``: the merge of two
random 4-layer models (hidden 512) with three GGUF types and quality, as tests/test_ray.py runs (a minute). ``large``:
the demo's recipe shape on two random 0.9B Llama variants (``--ray-only``: an hour on 2 cores).

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


def large_recipe(root: Path) -> Path:
    """The demo's recipe shape (SLERP, two GGUF types, AWQ, W4A16, MLX, quality) on two random 0.9B Llama variants
    (bench_gguf.py's shape, SmolLM2's tokenizer): the second model size the on-paper figures are fitted from. The stop
    audit runs but passes whatever the answers (random weights never stop: every answer takes its full length); the
    quality gate is off and publish skipped (random weights fail the gate)."""
    from bench_gguf import LARGE, large_model

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "releaser" / "fixtures"
    smollm2 = cache / "smollm2-135m-instruct-float32"
    a, b = large_model(cache, smollm2), large_model(cache, smollm2, seed=2, name="bench-llama-0.9b-b-bf16")
    path = root / "large.yaml"
    path.write_text(f"""name: bench/Large-Slerp-0.9B
description: The demo's release of two random 0.9B Llama variants, for the Ray benchmark.
stop_audit: {{min_ended: 0}}
merge:
  merge_method: slerp
  base_model: {a}
  slices:
    - sources:
        - {{model: {a}, layer_range: [0, {LARGE['layers']}]}}
        - {{model: {b}, layer_range: [0, {LARGE['layers']}]}}
  parameters:
    t:
      - {{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}}
      - {{filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}}
      - value: 0.5
  dtype: bfloat16
tokenizer: {{template: chatml}}
gguf: {{quants: [Q8_0, Q4_K_M]}}
awq: {{samples: 32, seqlen: 256, formats: [autoawq, compressed-tensors]}}
mlx: {{}}
quality: {{chunks: 8, gate: false}}
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


FIXED = ("tokenizer", "runtimes", "cards")   # copies and small files: not scaled with the model's size


def units(root: Path) -> tuple[float, dict[str, float]]:
    """(parameters, seconds of each kind of unit) of a bench run in ``root`` (its Ray run's manifest: every unit's
    time; ``params.json``, written by the run, has the model's size)."""
    stages = json.loads((root / "ray" / "release.json").read_text())["stages"]
    tasks = {name: {t["task"]: t["seconds"] for t in e.get("tasks", []) if t["task"] != name}
             for name, e in stages.items()}
    out = {name: stages[name]["seconds"] for name in ("merge", "verify", "awq", "w4a16", "mlx", *FIXED)
           if name in stages}
    out["gguf type"] = sum(tasks["gguf"].values()) / len(tasks["gguf"])
    q = tasks["quality"]
    gguf = [v for k, v in q.items() if k.endswith(".gguf") and not k.startswith("stop test")]
    out["quality: one GGUF"] = sum(gguf) / len(gguf)
    out["quality: unquantized pass"] = q["unquantized model"]
    out["quality: stop test"] = next(v for k, v in q.items() if k.startswith("stop test"))
    for k, v in q.items():
        if k.endswith(("-AWQ", "-MLX-4bit")):   # W4A16 takes AWQ's figures now (a weight hash, ~1 s)
            out[f"quality: {k.rsplit('-', 1)[1] if k.endswith('-AWQ') else 'MLX'}"] = v
    return json.loads((root / "params.json").read_text())["params"], out


def on_paper(small: Path, large: Path, params: float = 70e9, types: int = 12, nodes: int = 8) -> None:
    """The 70B release on paper from two measured releases of the same recipe shape (``small``: the demo,
    ``large``: the 0.9B one): each kind of unit's time fitted as a + b * parameters through the two sizes (the
    fixed part a: a worker's imports, tokenizing; b: the work that grows with the weights, at a fixed calibration and
    evaluation text) and taken at ``params``; a slope below zero (noise) falls back to scaling the larger run's time.
    One node in process against ``nodes`` CPU nodes and a GPU node on Ray: ``types`` GGUF types, their measurements
    and the AWQ and MLX ones side by side, and the stages that do not read each other side by side (the total is the
    longest path through the stages' prerequisites, ``AFTER``)."""
    from releaser.pipeline.stages import AFTER, NAMES

    (p1, t1), (p2, t2) = units(small), units(large)
    h = {}
    print(f"on paper: {params / 1e9:.0f}B parameters, from {p1 / 1e6:.0f}M and {p2 / 1e6:.0f}M measured; per unit "
          "kind, seconds at each size and the fit taken at the target:")
    for kind in (k for k in t1 if k in t2):
        slope = (t2[kind] - t1[kind]) / (p2 - p1)
        at = t2[kind] if kind in FIXED else (t2[kind] + slope * (params - p2) if slope > 0 else t2[kind] * params / p2)
        h[kind] = at / 3600
        print(f"  {kind:28s} {t1[kind]:8.1f} s {t2[kind]:8.1f} s  ({t2[kind] / t1[kind]:4.1f}x for "
              f"{p2 / p1:.1f}x the weights)  -> {h[kind]:6.2f} h")
    folders = [v for k, v in h.items() if k in ("quality: AWQ", "quality: MLX")]
    waves = -(-(types + len(folders)) // (nodes + 1))
    one = {"merge": h["merge"], "verify": h["verify"], "gguf": types * h["gguf type"], "awq": h["awq"],
           "w4a16": h["w4a16"], "mlx": h["mlx"],
           "quality": (h["quality: stop test"] + h["quality: unquantized pass"] + types * h["quality: one GGUF"]
                       + sum(folders)), **{k: h[k] for k in FIXED}}
    many = {**one, "gguf": -(-types // nodes) * h["gguf type"],
            "quality": (max(h["quality: stop test"], h["quality: unquantized pass"])
                        + waves * max([h["quality: one GGUF"], *folders]))}
    print(f"  {'stage':9s} {'1 node':>8s} {nodes} CPU + 1 GPU nodes")
    for name in (n for n in NAMES if n in one):
        print(f"  {name:9s} {one[name]:7.1f} h {many[name]:7.1f} h")
    ends, via = {}, {}   # the cluster: each stage starts when its prerequisites have ended
    for name in NAMES:
        before = max((p for p in AFTER[name] if p in ends), key=lambda p: ends[p], default=None)
        ends[name], via[name] = (ends[before] if before else 0.0) + many.get(name, 0.0), before
    last, path = max(ends, key=ends.get), []
    while last is not None:
        path.append(last)
        last = via[last]
    critical = ", ".join(f"{n} {many[n]:.1f} h" for n in reversed(path) if many.get(n, 0) >= 0.1)
    print(f"  total: one node {sum(one.values()):.1f} h; {nodes} CPU + 1 GPU nodes {sum(many.values()):.1f} h with the "
          f"stages in order, {max(ends.values()):.1f} h with the stages side by side (the critical path: {critical})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", choices=("demo", "small", "large"), default="demo")
    ap.add_argument("--ray-only", action="store_true", help="only the Ray run (its manifest has every task's time)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--on-paper", nargs=2, type=Path, metavar=("SMALL", "LARGE"),
                    help="only the 70B estimate from two earlier runs' --work folders (demo, large)")
    args = ap.parse_args()
    if args.on_paper:
        on_paper(*args.on_paper)
        return
    root = args.work or Path(tempfile.mkdtemp(prefix="bench-ray-"))
    root.mkdir(parents=True, exist_ok=True)
    recipe = {"demo": demo_recipe, "small": small_recipe, "large": large_recipe}[args.recipe](root)
    base = [sys.executable, "-m", "releaser.cli", "release", str(recipe), "--quiet"]
    if args.recipe == "large":
        base += ["--skip", "publish"]
    load = os.getloadavg()[0]

    if not args.ray_only:
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
    from releaser.tasks import float_bytes

    main_dir = next(p for p in (root / "ray").iterdir() if (p / "config.json").is_file() and p.name != "merged"
                    and not p.name.endswith(("-AWQ", "-W4A16", "-MLX-4bit")))
    (root / "params.json").write_text(json.dumps({"params": float_bytes(main_dir)[0] // 4}))   # for --on-paper
    print(f"releaser release {recipe.name} (load average {load:.1f} before, {os.cpu_count()} cores)")
    if args.ray_only:
        print(f"  ray, 2 nodes of 1 CPU: wall {on_ray['wall_s']:.1f} s, driver peak RSS {on_ray['rss'] / 1e9:.2f} GB, "
              f"all processes {on_ray['tree'] / 1e9:.2f} GB\n    {tasks_line(root / 'ray')}")
        return
    same = hashes(root / "local") == hashes(root / "ray")
    print(f"  in-process: wall {local['wall_s']:.1f} s, peak RSS {local['rss'] / 1e9:.2f} GB (all processes "
          f"{local['tree'] / 1e9:.2f} GB)")
    print(f"    {tasks_line(root / 'local')}")
    print(f"  ray, 2 nodes of 1 CPU (cluster up in {up:.1f} s, idle {idle / 1e9:.2f} GB, not in the run's time): wall "
          f"{on_ray['wall_s']:.1f} s ({on_ray['wall_s'] / local['wall_s']:.2f}x; target <= 1.2x), driver peak RSS "
          f"{on_ray['rss'] / 1e9:.2f} GB, all processes (cluster included) {on_ray['tree'] / 1e9:.2f} GB")
    print(f"    {tasks_line(root / 'ray')}")
    print(f"  artefacts byte-identical: {same}")


if __name__ == "__main__":
    main()
