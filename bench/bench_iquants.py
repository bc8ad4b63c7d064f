"""Benchmark the I-quants on bench_gguf's synthetic 0.9B Llama: `releaser gguf` (HF folder -> TYPE with an importance
matrix) against llama.cpp's own `llama-quantize` (F32 GGUF -> TYPE, the same importance matrix, 2 threads), both as
whole processes under /usr/bin/time -v in the same run; the tensors of the two files are compared.

llama-quantize's side starts from an F32 GGUF made beforehand (its conversion is not counted), so the ratio favours
it. The importance matrix is synthetic (seeded, positive, heavy-tailed per column: no calibration run on random
weights), the same file for both. llama-quantize comes from tests/build_llama_tools.sh (built once and cached).

    python bench/bench_iquants.py [--types IQ4_XS,IQ3_S,...] [--work DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_gguf import BIN, large_model, timed  # noqa: E402

TYPES = "IQ4_NL,IQ4_XS,IQ3_S,IQ3_M,IQ3_XS,IQ3_XXS,IQ2_M,IQ2_S,IQ2_XS,IQ2_XXS,IQ1_M,IQ1_S"


def synthetic_imatrix(f32: Path, path: Path) -> None:
    """An importance matrix for every 2-D weight of ``f32`` (token embeddings aside, as llama-imatrix)."""
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", ["synthetic"])
    w.add_uint32("imatrix.chunk_count", 100)
    w.add_uint32("imatrix.chunk_size", 512)
    for t in gguf.GGUFReader(f32).tensors:
        if len(t.shape) == 2 and t.name != "token_embd.weight":
            n = int(t.shape[0])   # gguf-py's shape: [n_per_row, rows]
            w.add_tensor(t.name + ".in_sum2", (rng.lognormal(0, 1.5, (1, n)) * 512).astype(np.float32))
            w.add_tensor(t.name + ".counts", np.array([51200], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tensors(path: Path) -> dict:
    import gguf

    return {t.name: (int(t.tensor_type), np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default=TYPES, help="comma-separated llama-quantize types")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    from releaser_testing import smollm2_dir

    root = Path(__file__).resolve().parents[1]
    tools = Path(subprocess.run(["bash", str(root / "tests" / "build_llama_tools.sh")], capture_output=True,
                                text=True, check=True).stdout.strip().splitlines()[-1])
    cache = Path.home() / ".cache" / "releaser" / "fixtures"
    model = large_model(cache, smollm2_dir())
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-iquants-"))
    f32 = work / "f32" / "bench-F32.gguf"
    if not f32.exists():
        subprocess.run([str(BIN / "releaser"), "gguf", str(model), "-o", str(f32.parent), "--quant", "F32",
                        "--name", "bench", "--quiet"], check=True)
    imatrix = work / "imatrix.gguf"
    synthetic_imatrix(f32, imatrix)
    print("| type | releaser (HF ->) | llama-quantize (F32 GGUF ->, 2 threads) | ratio | peak RSS ours / theirs | "
          "same tensors |\n|---|---|---|---|---|---|", flush=True)
    for quant in args.types.split(","):
        ours_dir, ref = work / f"ours-{quant}", work / f"ref-{quant}.gguf"
        ours, ours_rss = timed([str(BIN / "releaser"), "gguf", str(model), "-o", str(ours_dir), "--quant", quant,
                                "--name", "bench", "--imatrix", str(imatrix), "--quiet", "--overwrite"])
        theirs, theirs_rss = timed([str(tools / "llama-quantize"), "--imatrix", str(imatrix), str(f32), str(ref),
                                    quant, "2"])
        same = tensors(ours_dir / f"bench-{quant}.gguf") == tensors(ref)
        print(f"| {quant} | {ours:.1f} s | {theirs:.1f} s | {ours / theirs:.2f}x | {ours_rss:.2f} / "
              f"{theirs_rss:.2f} GB | {'yes' if same else 'NO'} |", flush=True)
        ref.unlink()


if __name__ == "__main__":
    main()
