"""Benchmark releaser's K-quant and I-quant quantizers against llama.cpp's ``llama_model_quantize`` on the same
float32 matrix.

For each type the same [rows, cols] float32 matrix (Student-t, like LLM weights) is quantized by
``releaser.gguf.quants.quantize`` in memory, and by llama.cpp (llama-cpp-python, in process, ``pure`` mix, 2 threads)
from a one-tensor F32 GGUF to a GGUF file. Both outputs are compared byte for byte. llama.cpp's time includes reading
the F32 file and writing the result (from/to the page cache), so the ratio slightly favours releaser.

With ``--imatrix`` (and always for IQ2_XXS, IQ2_XS, IQ2_S and IQ1_S, which llama.cpp makes only with importance weights)
both take the same synthetic importance weights: releaser in memory, llama.cpp as ``llama-quantize --imatrix FILE
--pure`` (the binary from tests/build_llama_tools.sh, ``--llama-quantize``; its time includes starting the process).

    python bench/bench_quants.py [--rows 4096] [--cols 4096] [--repeat 3] [--types Q2_K,Q3_K,...,IQ3_XXS,IQ2_S]
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np

from releaser.gguf import quants

# the llama-quantize mix whose default (``pure``) type is the type
FTYPE_FOR = {"Q2_K": "Q2_K", "Q3_K": "Q3_K_S", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q6_K": "Q6_K",
             "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS", "IQ3_S": "IQ3_S", "IQ3_XXS": "IQ3_XXS",
             "IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS", "IQ2_S": "IQ2_M", "IQ1_S": "IQ1_S", "IQ1_M": "IQ1_M"}
WEIGHTED = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S")   # llama.cpp makes them only with importance weights
TOOLS = Path.home() / ".cache" / "releaser" / "llama-cpp-tools-0.3.36" / "bin" / "llama-quantize"


def write_one_tensor_gguf(path: Path, data: np.ndarray) -> None:
    """A one-layer llama GGUF whose only weight is ``token_embd.weight`` (enough for llama_model_quantize; IQ3_XXS, which
    it refuses without an imatrix elsewhere, is allowed for the token embeddings)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    hidden = data.shape[1]
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(hidden)
    writer.add_head_count(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tensor("token_embd.weight", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_cpp_quantize(src: Path, dst: Path, ftype: str, nthread: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = nthread
    params.pure = True
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed with {rc}")


def write_imatrix(path: Path, weights: np.ndarray) -> None:
    """A llama-imatrix GGUF whose one entry (``token_embd.weight``) gives ``weights`` (in_sum2 / counts)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.type", "imatrix")
    writer.add_array("imatrix.datasets", ["synthetic"])
    writer.add_uint32("imatrix.chunk_count", 1)
    writer.add_uint32("imatrix.chunk_size", 512)
    writer.add_tensor("token_embd.weight.in_sum2", weights.reshape(1, -1) * np.float32(128))
    writer.add_tensor("token_embd.weight.counts", np.array([128], np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_quantize_binary(binary: Path, src: Path, dst: Path, ftype: str, nthread: int, imatrix: Path) -> float:
    """``llama-quantize --imatrix --pure``; returns the child's CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([str(binary), "--imatrix", str(imatrix), "--pure", str(src), str(dst), ftype, str(nthread)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"llama-quantize failed: {proc.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def best_of(repeat: int, fn):
    """(best wall seconds, best process CPU seconds, last result) of ``repeat`` calls."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (releaser uses numba's pool)")
    parser.add_argument("--types", default=",".join(FTYPE_FOR))
    parser.add_argument("--imatrix", action="store_true", help="importance weights for every type (IQ2: always)")
    parser.add_argument("--llama-quantize", type=Path, default=TOOLS, help="the llama-quantize binary (weighted runs)")
    args = parser.parse_args()

    import llama_cpp

    llama_cpp.llama_backend_init()
    silence = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(silence, ctypes.c_void_p(0))
    rng = np.random.default_rng(0)
    data = (rng.standard_t(5, (args.rows, args.cols)) * 0.02).astype(np.float32)
    mb = data.nbytes / 1e6
    print(f"matrix {args.rows}x{args.cols} float32 ({mb:.0f} MB), best of {args.repeat}")
    print("wall = best wall-clock seconds, cpu = best process CPU seconds (all threads); ratio = releaser / llama.cpp")
    print(f"{'type':6} {'ours wall':>9} {'MB/s':>6} {'cpu':>6} | {'llama wall':>10} {'MB/s':>6} {'cpu':>6} | "
          f"{'ratio wall':>10} {'cpu':>5} | identical")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "f32.gguf"
        write_one_tensor_gguf(src, data)
        weights = ((rng.random(args.cols) ** 4) * 10 + 0.01).astype(np.float32)
        imatrix = Path(tmp) / "imatrix.gguf"
        write_imatrix(imatrix, weights)
        for name in args.types.split(","):
            qtype = gguf.GGMLQuantizationType[name]
            w = weights if args.imatrix or name in WEIGHTED else None
            quants.quantize(data[:1, :256], qtype, None if w is None else w[:256])  # numba compile / cache load
            ours_s, ours_cpu, ours = best_of(args.repeat, lambda: quants.quantize(data, qtype, w))
            dst = Path(tmp) / f"{name}.gguf"
            if w is None:
                theirs_s, theirs_cpu, _ = best_of(args.repeat, lambda: llama_cpp_quantize(src, dst, FTYPE_FOR[name],
                                                                                         args.threads))
            else:   # the child's CPU time, not this process's
                runs = [(time.perf_counter(), llama_quantize_binary(args.llama_quantize, src, dst, FTYPE_FOR[name],
                                                                    args.threads, imatrix), time.perf_counter())
                        for _ in range(args.repeat)]
                theirs_s, theirs_cpu = min(b - a for a, _, b in runs), min(c for _, c, _ in runs)
            tensor = gguf.GGUFReader(dst).tensors[0]
            same = tensor.tensor_type == qtype and np.array_equal(np.asarray(tensor.data).reshape(-1), ours.reshape(-1))
            print(f"{name:6} {ours_s:9.2f} {mb / ours_s:6.1f} {ours_cpu:6.2f} | {theirs_s:10.2f} {mb / theirs_s:6.1f} "
                  f"{theirs_cpu:6.2f} | {ours_s / theirs_s:10.2f} {ours_cpu / theirs_cpu:5.2f} | {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
