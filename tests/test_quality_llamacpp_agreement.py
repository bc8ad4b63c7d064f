"""The quality stage's figures are those llama.cpp computes: the activation quantizers bit-exact against ggml-cpu's own
(llama-cpp-python's libggml-cpu), and the figures of SmolLM2's Q8_0 and Q4_K_M files against `llama-perplexity
--kl-divergence-base` (an F32 GGUF of the unquantized model) / `--kl-divergence` on the same windows.

How close the KLD can be: llama.cpp rounds each matrix product's input to 8 bits, so which way an activation near a
rounding boundary goes depends on the last bits of everything before it, and those differ between any two
implementations (torch against ggml, and ggml against itself on AVX2, AVX-512 or ARM, with or without flash
attention). The rounding noise is then a different draw: its size is the same, the tokens it hits are not. On these
2040 scored tokens, perturbing the inputs by 1e-7 (five draws) gives SmolLM2's mean KLD a spread (standard deviation)
of 1.9% for Q8_0, where activation rounding is most of the KLD, and 0.6% for Q4_K_M, and same top a spread of 0.2 and
0.4 points; llama.cpp's figures lie within about one such spread of our draws' mean (same top for Q8_0: 2.5), and flash
attention on or off moves llama.cpp's own Q8_0 figure by 0.4%. The bounds below are those spreads, not slack for a
known bias."""

from __future__ import annotations

import ctypes
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import require

from releaser.errors import ModelError
from releaser.quality import QualityOptions, run_quality
from releaser.quality.numerics import ACTIVATIONS, activation_format, quantize, quantize_q8_0, quantize_q8_k
from releaser.quality.text import BUILTIN

CTX, CHUNKS = 512, 8   # the demo's windows: 2040 scored tokens


def _ggml_cpu():
    llama_cpp = require("llama_cpp")
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"))
    for name in ("quantize_row_q8_0", "quantize_row_q8_K"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


def _activations(n: int) -> np.ndarray:
    """Heavy-tailed rows with outliers, a zero block, a negative extreme and exact halves (rounding ties)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(n) * np.exp(rng.standard_normal(n))).astype(np.float32)
    x[::1000] *= 50
    x[5 * 256: 6 * 256] = 0
    x[7 * 256 + 3] = -abs(x[7 * 256 + 3]) * 1e3
    x[8 * 256: 9 * 256] = ((np.arange(256) - 128) / 2 * 127 / 64).astype(np.float32)
    return x


def test_activation_quantizers_equal_ggml_cpu():
    """Q8_0 (AVX path: 127/max, round half to even, float16 scale) and Q8_K (the reference: -127/signed max, float32
    scale) dequantized values equal ggml-cpu's blocks bit for bit."""
    lib = _ggml_cpu()
    x = _activations(256 * 2000)
    for fn, block, nbytes, ours in (("quantize_row_q8_0", 32, 34, quantize_q8_0),
                                    ("quantize_row_q8_K", 256, 292, quantize_q8_k)):
        raw = np.zeros(x.size // block * nbytes, np.uint8)
        getattr(lib, fn)(x.ctypes.data, raw.ctypes.data, x.size)
        raw = raw.reshape(-1, nbytes)
        if block == 32:
            d, q = raw[:, :2].copy().view(np.float16).astype(np.float32), raw[:, 2:34].copy().view(np.int8)
        else:
            d, q = raw[:, :4].copy().view(np.float32), raw[:, 4:260].copy().view(np.int8)
        theirs = (q.astype(np.float32) * d).reshape(-1)
        assert np.array_equal(ours(torch.from_numpy(x)).numpy(), theirs), fn


def test_activation_formats():
    assert activation_format("Q4_K") == activation_format("Q6_K") == activation_format("IQ4_XS") == "q8_k"
    assert activation_format("Q8_0") == activation_format("Q5_0") == activation_format("IQ4_NL") == "q8_0"
    assert activation_format("F16") == "f16" and activation_format("BF16") == "bf16"
    assert set(ACTIVATIONS.values()) == {"f32", "f16", "bf16", "q8_0", "q8_k"}
    x = torch.randn(3, 512)
    assert torch.equal(quantize(x, "f32"), x)
    assert torch.equal(quantize(x, "f16"), x.half().float())
    with pytest.raises(ValueError, match="do not split into q8_k blocks"):
        quantize(torch.randn(2, 576), "q8_k")
    with pytest.raises(ModelError, match="no llama.cpp CPU dot product .* Q9_X; measure the file with numerics float32"):
        activation_format("Q9_X")


# ---------------------------------------------------------------------------------------------------- end to end


def _perplexity(tools: Path, *args: str) -> str:
    proc = subprocess.run([str(tools / "llama-perplexity"), *args], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _figure(log: str, label: str) -> float:
    m = re.search(re.escape(label) + r"\s*:\s*([-\d.]+)", log)
    assert m, f"no {label!r} in llama-perplexity's output"
    return float(m.group(1))


@pytest.fixture(scope="module")
def llama_figures(llama_tools, smollm2, smollm2_ggufs, tmp_path_factory):
    """llama-perplexity's figures for the Q8_0 and Q4_K_M files against an F32 GGUF, and the windows it used."""
    from releaser.gguf import export_gguf

    work = tmp_path_factory.mktemp("llama-perplexity")
    f32 = export_gguf(smollm2, work, ["F32"], name="SmolLM2-135M-Instruct").files["F32"][0]
    base = work / "base.kld"
    log = _perplexity(llama_tools, "-m", str(f32), "-f", str(BUILTIN), "-c", str(CTX), "--chunks", str(CHUNKS),
                      "--kl-divergence-base", str(base), "-t", "2")
    f32.unlink()
    head = np.fromfile(base, dtype=np.int32, count=5 + CTX * CHUNKS)   # magic, n_ctx, n_vocab, n_chunk, tokens
    assert head[:2].tobytes() == b"_logits_" and head[2] == CTX and head[4] == CHUNKS
    out = {"windows": torch.from_numpy(head[5:].astype(np.int64)).view(CHUNKS, CTX),
           "base_ppl": float(re.search(r"Final estimate: PPL = ([\d.]+)", log).group(1))}
    for quant in ("Q8_0", "Q4_K_M"):
        log = _perplexity(llama_tools, "-m", str(smollm2_ggufs[quant]), "--kl-divergence-base", str(base),
                          "--kl-divergence", "-c", str(CTX), "-t", "2")
        out[quant] = {"ppl": _figure(log, "Mean PPL(Q)"), "base_ppl": _figure(log, "Mean PPL(base)"),
                      "kld_mean": _figure(log, "Mean    KLD"), "kld_p99": _figure(log, "99.0%   KLD"),
                      "same_top": _figure(log, "Same top p") / 100}
    return out


@pytest.fixture(scope="module")
def ours(smollm2, smollm2_ggufs, tmp_path_factory):
    paths = [smollm2_ggufs["Q8_0"], smollm2_ggufs["Q4_K_M"]]
    out = tmp_path_factory.mktemp("quality") / "quality.json"
    return run_quality(QualityOptions(ctx=CTX, chunks=CHUNKS, stop_test=False), smollm2, paths, out).facts


def test_same_windows_as_llama_perplexity(smollm2, llama_figures):
    from transformers import AutoTokenizer

    from releaser.quality.text import load_text, make_windows

    windows = make_windows(AutoTokenizer.from_pretrained(smollm2), load_text(), CTX, CHUNKS)
    assert torch.equal(windows.tokens, llama_figures["windows"])


def test_figures_equal_llama_perplexity(ours, llama_figures):
    """Base perplexity to 1e-4 (the same arithmetic: F32 weights, float16 K/V); each file's perplexity within 1%, mean
    KLD within 5% (Q4_K_M) and 8% (Q8_0: its KLD is mostly activation rounding, a different draw in each
    implementation, see the module's docstring), 99th percentile within 10%, same top token within 1.5 points. The
    float32 figures this replaces were 3.4x (Q8_0) and 0.90x (Q4_K_M) llama.cpp's KLD."""
    assert ours["numerics"] == "llama.cpp"
    assert ours["model"]["ppl"] == pytest.approx(llama_figures["base_ppl"], rel=1e-4)
    rows = {r["quant"]: r for r in ours["artefacts"]}
    for quant, kld_rel in (("Q8_0", 0.08), ("Q4_K_M", 0.05)):
        row, ref = rows[quant], llama_figures[quant]
        assert ref["base_ppl"] == pytest.approx(llama_figures["base_ppl"], rel=1e-4)
        assert row["ppl"] == pytest.approx(ref["ppl"], rel=0.01), quant
        assert row["kld_mean"] == pytest.approx(ref["kld_mean"], rel=kld_rel), quant
        assert row["kld_p99"] == pytest.approx(ref["kld_p99"], rel=0.10), quant
        assert abs(row["same_top"] - ref["same_top"]) <= 0.015, quant


def test_llama_cpp_backend_needs_llama_cpp_numerics():
    from releaser.errors import ConfigError

    assert QualityOptions().numerics == "llama.cpp"
    with pytest.raises(ConfigError, match="llama.cpp backend computes with llama.cpp's own arithmetic"):
        QualityOptions.build(backend="llama.cpp", numerics="float32")
