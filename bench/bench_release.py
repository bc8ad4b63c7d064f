"""Benchmark `releaser release` on the demo recipe end to end, as whole processes under /usr/bin/time -v: the first
run (merge, tokenizer, verify, GGUF, AWQ, quality, cards, local publish), an unchanged rerun, and each stage's
seconds from the manifest.

    python bench/bench_release.py [--work DIR] [--skip awq,quality]

Targets (2 cores): the whole demo <= 5 minutes before AWQ, <= 15 minutes with it; an unchanged rerun <= 10% of the
first run. The inputs (two SmolLM2 variants) are made first and are not timed, as a cached fixture.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # releaser_testing: the repo's fixtures (not installed)

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str]) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    h, m, s = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr).groups()
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1e6
    return {"wall_s": (int(h or 0) * 60 + int(m)) * 60 + float(s), "rss_gb": rss}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--skip", default=None, help="stages to leave out, e.g. awq,quality")
    args = ap.parse_args()
    from releaser_testing import demo_inputs

    root = args.work or Path(tempfile.mkdtemp(prefix="bench-release-"))
    demo_inputs(root / "demo")
    shutil.copytree(ROOT / "recipes", root / "recipes", dirs_exist_ok=True)
    recipe, work = root / "recipes" / "demo.yaml", root / "work"
    shutil.rmtree(work, ignore_errors=True)
    cmd = [sys.executable, "-m", "releaser.cli", "release", str(recipe), "-o", str(work), "--quiet"]
    cmd += ["--skip", args.skip] if args.skip else []
    load = os.getloadavg()[0]
    first = timed(cmd)
    again = timed(cmd)
    stages = json.loads((work / "release.json").read_text())["stages"]
    print(f"releaser release recipes/demo.yaml{' --skip ' + args.skip if args.skip else ''} "
          f"(load average {load:.1f} before, {os.cpu_count()} cores)")
    print(f"  first run: wall {first['wall_s']:.0f} s, peak RSS {first['rss_gb']:.2f} GB; stages: "
          + ", ".join(f"{name} {entry['seconds']:.0f} s" for name, entry in stages.items()))
    ratio = again["wall_s"] / first["wall_s"]
    print(f"  unchanged rerun: wall {again['wall_s']:.1f} s ({ratio:.1%} of the first; target <= 10%), peak RSS "
          f"{again['rss_gb']:.2f} GB")
    limit = 300 if args.skip and "awq" in args.skip else 900
    print(f"  target first run <= {limit} s:", "met" if first["wall_s"] <= limit else "NOT met")


if __name__ == "__main__":
    main()
