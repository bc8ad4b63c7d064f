"""Benchmark `releaser eval` (the quality stage) on SmolLM2-135M-Instruct: 8 windows of 512 tokens of the built-in text,
F16 + Q8_0 + Q4_K_M GGUFs and an AWQ GEMM folder, as one whole process under /usr/bin/time -v.

Targets (issue 12): <= 2 minutes wall, peak RSS <= 2x the unquantized model's size. The peer, in the same run, is the
same command with --backend llama.cpp (the GGUFs run by llama.cpp through llama-cpp-python instead of dequantized
into torch; the unquantized pass and the AWQ folder run in torch in both).

The AWQ folder is a round-to-nearest GEMM quantization made here (releaser_testing.rtn_awq, group 64): the same file
format as the AWQ stage writes, without its activation-aware scale search. The GGUF files and the AWQ folder are built
once and cached in --work. Other processes on the machine slow the figures down: the load average is printed.

    python bench/bench_quality.py [--work DIR] [--no-peer]
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


def timed(cmd: list[str]) -> dict:
    """Run cmd under /usr/bin/time -v: wall seconds, CPU seconds, peak RSS bytes."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    if proc.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")
    err = proc.stderr
    h, m, s = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", err).groups()
    cpu = float(re.search(r"User time \(seconds\): ([\d.]+)", err).group(1)) + \
        float(re.search(r"System time \(seconds\): ([\d.]+)", err).group(1))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1)) * 1024
    return {"wall": (int(h or 0) * 60 + int(m)) * 60 + float(s), "cpu": cpu, "rss": rss}


def artefacts(work: Path, model: Path) -> list[Path]:
    from releaser.gguf import export_gguf
    from releaser_testing import rtn_awq

    gguf_dir = work / "gguf"
    files = [gguf_dir / f"SmolLM2-135M-Instruct-{q}.gguf" for q in ("F16", "Q8_0", "Q4_K_M")]
    if not all(f.exists() for f in files):
        export_gguf(model, gguf_dir, ["F16", "Q8_0", "Q4_K_M"], name="SmolLM2-135M-Instruct", overwrite=True)
    awq = work / "SmolLM2-135M-Instruct-AWQ"
    if not (awq / "config.json").exists():
        rtn_awq(model, awq, group_size=64)
    return [*files, awq]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "releaser-bench-quality")
    ap.add_argument("--no-peer", action="store_true", help="skip the --backend llama.cpp run")
    args = ap.parse_args()
    from releaser_testing import smollm2_dir

    model = smollm2_dir()
    model_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    args.work.mkdir(parents=True, exist_ok=True)
    arts = artefacts(args.work, model)
    cmd = [sys.executable, "-m", "releaser.cli", "eval", str(model), *map(str, arts), "--ctx", "512", "--chunks", "8",
           "--quiet"]
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    runs = {"releaser eval (torch)": (timed(cmd + ["-o", str(args.work / "quality.json")]), "quality.json")}
    if not args.no_peer:
        runs["releaser eval --backend llama.cpp"] = (
            timed(cmd + ["--backend", "llama.cpp", "-o", str(args.work / "quality-llamacpp.json")]),
            "quality-llamacpp.json")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"\nunquantized model: {model_bytes / 1e6:.0f} MB (float32 safetensors); targets: wall <= 120 s, "
          f"peak RSS <= {2 * model_bytes / 1e9:.2f} GB\n")
    print(f"{'run':36s} {'wall s':>8s} {'CPU s':>8s} {'peak RSS GB':>12s} {'RSS/model':>10s}")
    for label, (t, _) in runs.items():
        print(f"{label:36s} {t['wall']:8.1f} {t['cpu']:8.1f} {t['rss'] / 1e9:12.2f} {t['rss'] / model_bytes:10.2f}")
    for label, (_, name) in runs.items():
        report = json.loads((args.work / name).read_text())
        print(f"\n{label}: {report['chunks']} windows of {report['ctx']} tokens, {report['scored_tokens']} scored; "
              f"unquantized PPL {report['model']['ppl']:.3f}; numerics {report.get('numerics', 'float32')}")
        print(f"  {'file':40s} {'PPL':>8s} {'mean KLD':>10s} {'99% KLD':>9s} {'same top':>9s}")
        for row in report["artefacts"]:   # per-file seconds are in the manifest, not the report
            print(f"  {row['file']:40s} {row['ppl']:8.3f} {row['kld_mean']:10.6f} {row['kld_p99']:9.5f} "
                  f"{100 * row['same_top']:8.1f}%")
        stop = report.get("stop_test")
        if stop:
            print(f"  stop test on {stop['file']}: {'passed' if stop['passed'] else 'FAILED'} {stop['text']!r}")


if __name__ == "__main__":
    main()
