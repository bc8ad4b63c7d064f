"""Benchmark `releaser imatrix` on SmolLM2-135M-Instruct (the float32 test fixture) against llama.cpp's llama-imatrix on
the F32 GGUF of the same model, with the same text (the builtin conversations rendered through SmolLM2's chat
template) and chunks, each as a whole process under /usr/bin/time -v: wall time, CPU time, peak RSS, and the ratio.

    python bench/bench_imatrix.py [--chunks 64] [--ctx 512] [--repeat 1] [--work DIR]

Targets on the 2-core CPU: <= 2 minutes for 64 x 512 tokens and no slower than llama-imatrix in the same run. The
machine is shared: the load average before and after each run is printed, and --repeat alternates the two tools so
figures can be read against it. llama-imatrix comes from tests/build_llama_tools.sh (built once, cached).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # releaser_testing: the repo's fixtures (not installed)
from bench_awq import BIN, timed  # noqa: E402 - after the path set-up


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    from releaser.gguf import export_gguf
    from releaser.imatrix.file import read
    from releaser.imatrix.text import load_calibration
    from releaser.tokenizer.model import load_tokenizer
    from releaser_testing import smollm2_dir

    root = Path(__file__).resolve().parents[1]
    tools = Path(subprocess.run(["bash", str(root / "tests" / "build_llama_tools.sh")], check=True,
                                capture_output=True, text=True).stdout.strip().splitlines()[-1])
    model = smollm2_dir()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-imatrix-"))
    gguf = work / "SmolLM2-F32.gguf"
    if not gguf.is_file():
        export_gguf(model, work, ["F32"], name="SmolLM2")
    text = load_calibration("builtin", load_tokenizer(model))
    (work / "calibration.txt").write_text(text.text + "\n", encoding="utf-8")   # -f drops one trailing newline
    ours_cmd = [str(BIN / "python"), "-m", "releaser.cli", "imatrix", str(model), "-o", str(work / "ours.gguf"),
                "--overwrite", "--chunks", str(args.chunks), "--ctx", str(args.ctx), "--quiet"]
    llama_cmd = [str(tools / "llama-imatrix"), "-m", str(gguf), "-f", str(work / "calibration.txt"), "--parse-special",
                 "--chunks", str(args.chunks), "-c", str(args.ctx), "-o", str(work / "llama.gguf")]
    rows = []
    for i in range(args.repeat):
        for name, cmd in (("releaser imatrix", ours_cmd), ("llama-imatrix", llama_cmd)):
            before = os.getloadavg()[0]
            r = timed(cmd)
            after = os.getloadavg()[0]
            rows.append((name, r))
            print(f"{name:17s} run {i + 1}: wall {r['wall_s']:6.1f} s, cpu {r['cpu_s']:6.1f} s, peak RSS "
                  f"{r['rss_gb']:.2f} GB (load average {before:.1f} before, {after:.1f} after, {os.cpu_count()} "
                  "cores)", flush=True)
    best = {n: min(r["wall_s"] for m, r in rows if m == n) for n in ("releaser imatrix", "llama-imatrix")}
    ratio = best["releaser imatrix"] / best["llama-imatrix"]
    ours, ref = read(work / "ours.gguf"), read(work / "llama.gguf")
    worst = max(float(abs(ours.entries[n].sums - e.sums).max() / abs(e.sums).max()) for n, e in ref.entries.items())
    print(f"SmolLM2-135M, {args.chunks} x {args.ctx} tokens: best wall releaser {best['releaser imatrix']:.1f} s, "
          f"llama-imatrix {best['llama-imatrix']:.1f} s, ratio {ratio:.2f}; largest sum difference {worst:.1e} of "
          "the tensor's largest sum")
    met = best["releaser imatrix"] <= 120 and ratio <= 1.0
    print("  targets: <= 120 s and <= llama-imatrix's time:", "met" if met else "NOT met")


if __name__ == "__main__":
    main()
