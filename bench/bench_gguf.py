"""Benchmark `releaser gguf` (HF -> Q4_K_M in one pass; `--quant IQ4_XS` another type) against llama.cpp's
convert_hf_to_gguf.py (F16) followed by llama_model_quantize (2 threads), both as whole processes under
/usr/bin/time -v, in the same run.

Case 1: SmolLM2-135M-Instruct (the float32 test fixture). Case 2: a synthetic ~0.9B Llama (bf16 safetensors, hidden
2048, 16 layers, SmolLM2's tokenizer). Case 3: a synthetic ~0.5B Qwen3 (Qwen3-0.6B's shape: hidden 1024, 28 layers,
16 heads of 128, QK-norm, tied embeddings; SmolLM2's vocabulary), made by transformers' Qwen3 class. Both built once
and cached. llama.cpp's converter comes from the llama-cpp-python
0.3.36 sdist (vendor/llama.cpp, with its own gguf-py on PYTHONPATH):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d DIR && tar xzf DIR/llama_cpp_python-0.3.36.tar.gz -C DIR
    python bench/bench_gguf.py --llama-cpp DIR/llama_cpp_python-0.3.36/vendor/llama.cpp [--work DIR] [--skip-large]
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # releaser_testing: the repo's fixtures (not installed)

BIN = Path(sys.executable).parent
QUANTIZE = """
import ctypes, sys, llama_cpp
llama_cpp.llama_backend_init()
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.nthread = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3]), 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""
LARGE = dict(layers=16, hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=49152)
QWEN3 = dict(layers=28, hidden=1024, intermediate=3072, heads=16, kv_heads=8, head_dim=128, vocab=49152, tied=True)


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run cmd under /usr/bin/time -v; return (wall seconds, peak RSS GB)."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    h, m, s = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr).groups()
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1e6
    return (int(h or 0) * 60 + int(m)) * 60 + float(s), rss


def large_model(cache: Path, smollm2: Path, seed: int = 1, name: str = "bench-llama-0.9b-bf16") -> Path:
    """The synthetic 0.9B Llama (bf16, SmolLM2's tokenizer), made once in ``cache``; another seed and name: a
    variant of the same shape (a merge's second model)."""
    from releaser_testing import tiny_model

    path = cache / name
    if not (path / "config.json").exists():
        tmp = cache / f".{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tiny_model(tmp, "llama", seed=seed, dtype="bfloat16", shard_bytes=1 << 30, **LARGE)
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(smollm2 / f, tmp / f)
        os.replace(tmp, path)
    return path


def qwen3_model(cache: Path, smollm2: Path) -> Path:
    from releaser_testing import tiny_family_model

    path = cache / "bench-qwen3-0.5b-bf16"
    if not (path / "config.json").exists():
        tmp = cache / ".bench-qwen3-0.5b-bf16"
        shutil.rmtree(tmp, ignore_errors=True)
        tiny_family_model(tmp, "qwen3", seed=1, dtype="bfloat16", **QWEN3)
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(smollm2 / f, tmp / f)
        os.replace(tmp, path)
    return path


def bench(label: str, model: Path, llama_cpp_dir: Path, work: Path, quant: str = "Q4_K_M") -> dict:
    out = work / label
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ours, ours_rss = timed([str(BIN / "releaser"), "gguf", str(model), "-o", str(out / "ours"), "--quant", quant,
                            "--name", "bench", "--quiet"])
    env = dict(os.environ, PYTHONPATH=str(llama_cpp_dir / "gguf-py"))
    f16 = out / "ref-F16.gguf"
    conv, conv_rss = timed([sys.executable, str(llama_cpp_dir / "convert_hf_to_gguf.py"), str(model), "--outtype", "f16",
                            "--outfile", str(f16)], env)
    quant_s, quant_rss = timed([sys.executable, "-c", QUANTIZE, str(f16), str(out / f"ref-{quant}.gguf"), quant])
    ours_file, ref_file = out / "ours" / f"bench-{quant}.gguf", out / f"ref-{quant}.gguf"
    row = dict(model=label, ours_s=ours, ours_rss_gb=ours_rss, llama_cpp_s=conv + quant_s, convert_s=conv,
               quantize_s=quant_s, llama_cpp_rss_gb=max(conv_rss, quant_rss), f16_gb=f16.stat().st_size / 1e9,
               ours_gb=ours_file.stat().st_size / 1e9, ref_gb=ref_file.stat().st_size / 1e9)
    shutil.rmtree(out, ignore_errors=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, required=True, help="vendor/llama.cpp folder of the llama-cpp-python sdist")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--skip-large", action="store_true", help="only the SmolLM2 case")
    ap.add_argument("--quant", default="Q4_K_M", help="the llama-quantize type both make (e.g. IQ4_XS)")
    ap.add_argument("--only", default=None, help="only the cases whose label starts with this (SmolLM2, Llama, Qwen3)")
    args = ap.parse_args()
    from releaser_testing import cache_dir, smollm2_dir

    smollm2 = smollm2_dir()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    cases = [("SmolLM2-135M (fp32)", smollm2)]
    if not args.skip_large:
        cases.append(("Llama-0.9B synthetic (bf16)", large_model(cache_dir(), smollm2)))
        cases.append(("Qwen3-0.5B synthetic (bf16)", qwen3_model(cache_dir(), smollm2)))
    if args.only:
        cases = [c for c in cases if c[0].startswith(args.only)]
    q = args.quant
    print(f"| model | releaser HF->{q} | llama.cpp convert F16 + quantize | ratio | releaser peak RSS | "
          f"llama.cpp peak RSS | F16 size | {q} size (ours / llama.cpp) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, model in cases:
        r = bench(label.split()[0], model, args.llama_cpp, work, q)
        print(f"| {label} | {r['ours_s']:.1f} s | {r['llama_cpp_s']:.1f} s ({r['convert_s']:.1f} + {r['quantize_s']:.1f}) "
              f"| {r['ours_s'] / r['llama_cpp_s']:.2f}x | {r['ours_rss_gb']:.2f} GB | {r['llama_cpp_rss_gb']:.2f} GB "
              f"| {r['f16_gb']:.2f} GB | {r['ours_gb']:.3f} / {r['ref_gb']:.3f} GB |", flush=True)


if __name__ == "__main__":
    main()
