"""Benchmark `releaser awq` on SmolLM2-135M-Instruct (the float32 test fixture) end to end, as a whole process under
/usr/bin/time -v: wall time, CPU time and peak RSS; then `releaser awq-eval` for the quality figures.

    python bench/bench_awq.py [--work DIR] [--samples 128] [--seqlen 512] [--search-tokens N] [--device auto]

Targets on the 2-core CPU: <= 5 minutes and <= 2 GB peak RSS (AutoAWQ 0.2.9: 25-55 minutes). The machine is shared:
the load average before and after is printed, so figures can be read against it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # releaser_testing: the repo's fixtures (not installed)

BIN = Path(sys.executable).parent


def timed(cmd: list[str]) -> dict:
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    h, m, s = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr).groups()
    user = float(re.search(r"User time \(seconds\): ([\d.]+)", proc.stderr).group(1))
    system = float(re.search(r"System time \(seconds\): ([\d.]+)", proc.stderr).group(1))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1e6
    return {"wall_s": (int(h or 0) * 60 + int(m)) * 60 + float(s), "cpu_s": user + system, "rss_gb": rss,
            "stdout": proc.stdout.strip()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--search-tokens", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-eval", action="store_true")
    args = ap.parse_args()
    from releaser_testing import smollm2_dir

    model = smollm2_dir()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-awq-"))
    out = work / "smollm2-awq"
    cmd = [str(BIN / "python"), "-m", "releaser.cli", "awq", str(model), "-o", str(out), "--overwrite",
           "--samples", str(args.samples), "--seqlen", str(args.seqlen), "--device", args.device]
    if args.search_tokens:
        cmd += ["--search-tokens", str(args.search_tokens)]
    load_before = os.getloadavg()[0]
    r = timed(cmd)
    load_after = os.getloadavg()[0]
    print(f"releaser awq SmolLM2-135M (samples {args.samples}, seqlen {args.seqlen}, device {args.device}): "
          f"wall {r['wall_s']:.0f} s, cpu {r['cpu_s']:.0f} s, peak RSS {r['rss_gb']:.2f} GB "
          f"(load average {load_before:.1f} before, {load_after:.1f} after, {os.cpu_count()} cores)")
    print("  targets: <= 300 s, <= 2 GB;", "met" if r["wall_s"] <= 300 and r["rss_gb"] <= 2 else "NOT met")
    if not args.no_eval:
        e = timed([str(BIN / "python"), "-m", "releaser.cli", "awq-eval", str(model), str(out), "-q"])
        data = json.loads((out / "awq_calibration.json").read_text())["eval"]
        ppl, kld, top = data["perplexity"], data["kld_mean"], data["same_top"]
        print(f"releaser awq-eval ({data['tokens']} scored tokens, wall {e['wall_s']:.0f} s, peak RSS "
              f"{e['rss_gb']:.2f} GB): perplexity unquantized {ppl['unquantized']:.3f}, AWQ {ppl['awq']:.3f}, "
              f"RTN {ppl['rtn']:.3f}; mean KLD AWQ {kld['awq']:.4f}, RTN {kld['rtn']:.4f}; same top AWQ "
              f"{top['awq']:.1%}, RTN {top['rtn']:.1%}")


if __name__ == "__main__":
    main()
