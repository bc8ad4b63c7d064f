"""Benchmark `releaser merge` against mergekit 0.1.5 and the I/O floor (whole processes, /usr/bin/time -v).

Case 1: two fp32 SmolLM2-135M variants (538 MB each) with the issue's gradient-slerp config (dtype bfloat16).
Case 2: two synthetic fp32 Llama models of >= 2 GB each, the same config (releaser vs the I/O floor only, unless
--mergekit-large is given).
The I/O floor is a plain Python process (no torch) that reads both inputs and writes a file of the output's size.

    python bench/bench_merge.py [--work DIR] [--skip-large | --skip-small] [--mergekit-large] [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # releaser_testing: the repo's fixtures (not installed)

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent

SLERP = {"merge_method": "slerp", "dtype": "bfloat16", "parameters": {"t": [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5}]}}

FLOOR = r"""
import sys
out, size, *inputs = sys.argv[1:]
buf = bytearray(16 << 20)
view = memoryview(buf)
for path in inputs:
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
with open(out, "wb", buffering=0) as f:
    left = int(size)
    while left > 0:
        left -= f.write(view[:min(left, len(buf))])
"""


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run cmd under /usr/bin/time -v; return (wall seconds, peak RSS GB)."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    h, m, s = wall.groups()
    seconds = (int(h or 0) * 60 + int(m)) * 60 + float(s)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1e6
    return seconds, rss


def weights(folder: Path) -> list[str]:
    return [str(p) for p in sorted(folder.glob("*.safetensors"))]


def size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def warm(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def run_case(title: str, a: Path, b: Path, cfg: dict, work: Path, with_mergekit: bool, repeat: int) -> None:
    """Time releaser, the I/O floor (and mergekit) ``repeat`` times, alternating, and compare the medians. Each run
    starts with the inputs in the page cache and no dirty pages from the run before (a floor run leaves its whole
    output for the kernel to write back, which would slow down whatever runs next)."""
    cfg = dict(cfg, base_model=str(a))
    cfg.setdefault("slices", [{"sources": [{"model": str(a), "layer_range": [0, layers(a)]},
                                             {"model": str(b), "layer_range": [0, layers(b)]}]}])
    cfg_path = work / f"{title}.yml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    ours_out, mk_out, floor_out = work / f"{title}-releaser", work / f"{title}-mergekit", work / f"{title}-floor.bin"
    inputs = weights(a) + weights(b)
    runs: dict[str, list[tuple[float, float]]] = {"releaser": [], "I/O floor": [], "mergekit": []}

    def settle() -> None:
        warm(inputs)
        os.sync()

    out_size = 0
    for _ in range(repeat):
        for p in (ours_out, mk_out):
            shutil.rmtree(p, ignore_errors=True)
        settle()
        runs["releaser"].append(timed([str(BIN / "releaser"), "merge", str(cfg_path), str(ours_out), "--quiet"], env))
        out_size = size_of(ours_out)
        shutil.rmtree(ours_out)
        settle()
        runs["I/O floor"].append(timed([sys.executable, "-c", FLOOR, str(floor_out), str(out_size), *inputs]))
        floor_out.unlink()
        if with_mergekit:
            settle()
            runs["mergekit"].append(timed([str(BIN / "mergekit-yaml"), str(cfg_path), str(mk_out), "--quiet"], env))
            shutil.rmtree(mk_out)
    print(f"\n== {title}: inputs {size_of(a) / 1e9:.2f} GB + {size_of(b) / 1e9:.2f} GB, output {out_size / 1e9:.2f} GB"
          f" (median of {repeat} runs; wall range in brackets)")
    print(f"{'':10} {'wall s':>8} {'range':>14} {'peak RSS GB':>12}")
    med = {}
    for name, values in runs.items():
        if values:
            walls = [w for w, _ in values]
            med[name] = (median(walls), median([r for _, r in values]))
            print(f"{name:10} {med[name][0]:8.2f} {f'[{min(walls):.2f}, {max(walls):.2f}]':>14} {med[name][1]:12.2f}")
    ours, floor = med["releaser"], med["I/O floor"]
    if with_mergekit:
        mk = med["mergekit"]
        print(f"ratio releaser/mergekit: wall {ours[0] / mk[0]:.2f}x (target <= 0.5), "
              f"peak RSS {ours[1] / mk[1]:.2f}x (target <= 0.5)")
    print(f"ratio releaser/I-O floor: wall {ours[0] / floor[0]:.2f}x"
          + (" (target <= 1.5)" if title == "large" else ""))


def layers(folder: Path) -> int:
    import json

    return json.loads((folder / "config.json").read_text())["num_hidden_layers"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--skip-small", action="store_true", help="only the >= 2 GB case")
    ap.add_argument("--mergekit-large", action="store_true", help="also run mergekit on the large case")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each command per case (medians are compared)")
    args = ap.parse_args()
    from releaser_testing import cache_dir, noised_variant, smollm2_dir, tiny_model

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    base = smollm2_dir()
    a = noised_variant(base, cache_dir() / "smollm2-variant-a", seed=1)
    b = noised_variant(base, cache_dir() / "smollm2-variant-b", seed=2)
    if not args.skip_small:
        run_case("smollm2", a, b, SLERP, work, with_mergekit=True, repeat=args.repeat)
    if not args.skip_large:
        big = dict(layers=8, hidden=2048, intermediate=5632, heads=16, kv_heads=16, vocab=32000)
        la = cache_dir() / "bench-large-a"
        lb = cache_dir() / "bench-large-b"
        for path, seed in ((la, 1), (lb, 2)):
            if not (path / "model.safetensors.index.json").exists():
                tiny_model(path, seed=seed, shard_bytes=1_000_000_000, **big)
        run_case("large", la, lb, SLERP, work, with_mergekit=args.mergekit_large, repeat=args.repeat)
    shutil.rmtree(work, ignore_errors=True) if args.work is None else None


if __name__ == "__main__":
    main()
