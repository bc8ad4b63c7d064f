"""releaser.gguf.quants: byte-identical with llama.cpp's llama_model_quantize (the oracle, via llama-cpp-python), plus
round-trip error bounds, edge cases and the API's bad-input errors."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import gguf
import numpy as np
import pytest

from releaser.errors import ConfigError
from releaser.gguf import kquants, quants
from releaser.gguf.quants import QuantizeError

QT = gguf.GGMLQuantizationType
K_TYPES = [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]
LEGACY_TYPES = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1]

# llama-quantize mix -> the tensor types its file must contain (this tiny model has n_gqa = 1, 4 layers)
FTYPES = {
    "Q2_K": {QT.Q2_K, QT.Q3_K, QT.Q6_K}, "Q3_K_S": {QT.Q3_K, QT.Q6_K}, "Q3_K_M": {QT.Q3_K, QT.Q4_K, QT.Q5_K},
    "Q3_K_L": {QT.Q3_K, QT.Q5_K}, "Q4_K_S": {QT.Q4_K, QT.Q5_K}, "Q4_K_M": {QT.Q4_K, QT.Q6_K},
    "Q5_K_S": {QT.Q5_K, QT.Q6_K}, "Q5_K_M": {QT.Q5_K, QT.Q6_K}, "Q6_K": {QT.Q6_K}, "Q8_0": {QT.Q8_0},
    "Q4_0": {QT.Q4_0}, "Q4_1": {QT.Q4_1}, "Q5_0": {QT.Q5_0}, "Q5_1": {QT.Q5_1}, "F16": {QT.F16}, "BF16": {QT.BF16},
}


def with_edge_rows(a: np.ndarray) -> np.ndarray:
    """Put llama.cpp's corner cases into the first rows of a [rows, cols >= 256] matrix."""
    a[0, :256] = 0.0                                   # all-zero super-block
    a[1, :256] = 0.37                                  # constant block
    a[2] = -np.abs(a[2])                               # negative only
    a[3] = np.abs(a[3]) + 0.01                         # positive only (min > 0 is clamped to 0)
    a[4] *= 1e4                                        # huge magnitudes (fp16 scales still finite)
    a[5] *= 1e-6                                       # tiny: fp16 subnormal super-block scales
    a[6] *= 1e-12                                      # tinier: scales flush to zero in fp16
    a[7, :32] = 0.0                                    # one zero sub-block inside a normal block
    a[7, 40:72] = -2.5                                 # a constant sub-block straddling two sub-blocks
    a[8, ::7] = 0.0                                    # sparse zeros
    a[9, :256] = np.linspace(-1, 1, 256)               # exact ties for the rounding
    a[10] = a[10].astype(np.float16).astype(np.float32)  # fp16-representable values
    a[11, 100] = 50.0                                  # one outlier
    a[12, :32] = -0.0                                  # signed zeros: an all -0.0 block, then non-negative
    a[12, 32:96] = np.abs(a[12, 32:96])                # blocks whose minimum 0 comes as +0.0 and -0.0 (C keeps
    a[12, [32, 33, 64, 65]] = [0.0, -0.0, -0.0, 0.0]   # the first one, numpy's min may not)
    a[12, 96:128] = np.repeat([0.0, 2e-5, -0.0, 3e-5], 8)
    return a


def tiny_tensors(layers: int = 4, hidden: int = 256, ff: int = 512, vocab: int = 512) -> dict[str, np.ndarray]:
    """A llama-shaped model whose weights mix normal, heavy-tailed and uniform-cubed rows, plus the edge rows."""
    rng = np.random.default_rng(1234)

    def mat(rows: int, cols: int, kind: int) -> np.ndarray:
        if kind == 0:
            a = rng.standard_normal((rows, cols)) * 0.02
        elif kind == 1:
            a = rng.standard_t(3, (rows, cols)) * 0.05
        else:
            a = rng.uniform(-1, 1, (rows, cols)) ** 3
        return with_edge_rows(a.astype(np.float32))

    tensors = {"token_embd.weight": mat(vocab, hidden, 0)}
    for i in range(layers):
        p = f"blk.{i}."
        tensors[p + "attn_norm.weight"] = np.ones(hidden, np.float32)
        for j, name in enumerate(("attn_q", "attn_k", "attn_v", "attn_output")):
            tensors[p + name + ".weight"] = mat(hidden, hidden, (i + j) % 3)
        tensors[p + "ffn_norm.weight"] = np.ones(hidden, np.float32)
        tensors[p + "ffn_gate.weight"] = mat(ff, hidden, i % 3)
        tensors[p + "ffn_up.weight"] = mat(ff, hidden, (i + 1) % 3)
        tensors[p + "ffn_down.weight"] = mat(hidden, ff, (i + 2) % 3)
    tensors["output_norm.weight"] = np.ones(hidden, np.float32)
    tensors["output.weight"] = mat(vocab, hidden, 1)
    return tensors


def write_f32_gguf(path, tensors: dict[str, np.ndarray], heads: int = 4) -> None:
    """An F32 llama GGUF with the few hyper-parameters llama_model_quantize needs."""
    hidden = tensors["token_embd.weight"].shape[1]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(sum(name.endswith("attn_q.weight") for name in tensors))
    writer.add_feed_forward_length(tensors["blk.0.ffn_up.weight"].shape[0])
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory):
    tensors = tiny_tensors()
    path = tmp_path_factory.mktemp("kquant") / "tiny-f32.gguf"
    write_f32_gguf(path, tensors)
    return path, tensors, {}


@pytest.mark.slow
@pytest.mark.parametrize("ftype", list(FTYPES))
def test_bytes_identical_to_llama_cpp(tiny_f32, ftype):
    import gguf_oracle as oracle
    src, tensors, cache = tiny_f32
    dst = src.parent / f"tiny-{ftype}.gguf"
    oracle.quantize(src, dst, ftype)
    seen = set()
    for tensor in gguf.GGUFReader(dst).tensors:
        qtype = QT(tensor.tensor_type)
        seen.add(qtype)
        if qtype == QT.F32:
            continue
        key = (tensor.name, qtype)
        if key not in cache:
            cache[key] = np.asarray(quants.quantize(tensors[tensor.name], qtype)).view(np.uint8).reshape(-1)
        theirs = np.asarray(tensor.data).view(np.uint8).reshape(-1)
        ours = cache[key]
        assert ours.shape == theirs.shape, (tensor.name, qtype.name)
        n_bad = int((ours != theirs).sum())
        assert n_bad == 0, f"{tensor.name} as {qtype.name}: {n_bad} of {ours.size} bytes differ from llama.cpp"
    assert FTYPES[ftype] <= seen, f"{ftype} file has {sorted(t.name for t in seen)}"


# relative RMSE bounds of dequantize(quantize(x)) on standard normal data (about 1.1-1.5x the measured values)
RMSE_BOUND = {QT.Q2_K: 0.40, QT.Q3_K: 0.22, QT.Q4_K: 0.11, QT.Q5_K: 0.055, QT.Q6_K: 0.025,
              QT.Q8_0: 0.006, QT.Q4_0: 0.13, QT.Q4_1: 0.11, QT.Q5_0: 0.065, QT.Q5_1: 0.055}


@pytest.mark.parametrize("qtype", K_TYPES + LEGACY_TYPES, ids=lambda t: t.name)
def test_round_trip_error(qtype):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((32, 512)).astype(np.float32)
    raw = quants.quantize(x, qtype)
    assert raw.dtype == np.uint8 and raw.shape == (32, 512 // quants.block_size(qtype) * quants.type_size(qtype))
    y = quants.dequantize(raw, qtype)
    assert y.shape == x.shape and y.dtype == np.float32
    rel = float(np.sqrt(np.mean((x - y) ** 2)) / np.sqrt(np.mean(x ** 2)))
    assert rel < RMSE_BOUND[qtype], f"{qtype.name}: relative RMSE {rel:.4f}"


@pytest.mark.parametrize("qtype", K_TYPES + LEGACY_TYPES, ids=lambda t: t.name)
def test_edge_cases_round_trip(qtype):
    rng = np.random.default_rng(3)
    x = with_edge_rows(rng.standard_normal((13, 256)).astype(np.float32))
    y = quants.dequantize(quants.quantize(x, qtype), qtype)
    assert np.all(np.isfinite(y))
    assert np.all(y[0] == 0.0), "an all-zero block must dequantize to zeros"
    bound = RMSE_BOUND[qtype] * 1.5
    for row in (1, 2, 3, 4, 8, 9, 10):  # constant, negative/positive-only, huge, sparse, ties, fp16 values
        rms = np.sqrt(np.mean(x[row] ** 2))
        err = np.sqrt(np.mean((x[row] - y[row]) ** 2))
        assert err <= bound * rms, f"{qtype.name} row {row}: relative RMSE {err / rms:.4f}"
    assert abs(y[11, 100] - 50.0) <= 0.15 * 50.0, f"{qtype.name}: the outlier became {y[11, 100]}"
    assert np.abs(y[5]).max() <= 2 * np.abs(x[5]).max(), "fp16-subnormal scales stay bounded"
    assert np.abs(y[6]).max() <= 1e-10, "values far below fp16 range quantize to (nearly) zero"


def test_api_shapes_and_sizes():
    x = np.random.default_rng(0).standard_normal((2, 3, 512)).astype(np.float32)
    raw = quants.quantize(x, QT.Q4_K)
    assert raw.shape == (2, 3, 2 * 144)
    np.testing.assert_array_equal(raw.reshape(6, -1), quants.quantize(x.reshape(6, 512), QT.Q4_K))
    assert quants.quantize(x.astype(np.float64), QT.Q6_K).tobytes() == quants.quantize(x, QT.Q6_K).tobytes()
    assert quants.bits_per_weight(QT.Q4_K) == 4.5
    assert quants.bits_per_weight(QT.Q6_K) == 6.5625
    assert quants.bits_per_weight(QT.Q8_0) == 8.5
    assert quants.block_size(QT.Q2_K) == 256 and quants.type_size(QT.Q2_K) == 84
    assert quants.can_quantize(576, QT.Q5_0) and not quants.can_quantize(576, QT.Q4_K)
    assert quants.quantize(x, QT.F16).dtype == np.float16
    t = np.asfortranarray(x.reshape(6, 512))  # non-contiguous input
    assert quants.quantize(t, QT.Q3_K).tobytes() == quants.quantize(x.reshape(6, 512), QT.Q3_K).tobytes()


def test_thread_safe():
    x = np.random.default_rng(1).standard_normal((64, 1024)).astype(np.float32)
    expected = {qtype: quants.quantize(x, qtype).tobytes() for qtype in (QT.Q4_K, QT.Q6_K, QT.Q8_0)}
    with ThreadPoolExecutor(4) as pool:
        jobs = [(qtype, pool.submit(quants.quantize, x, qtype)) for qtype in expected for _ in range(3)]
        for qtype, job in jobs:
            assert job.result().tobytes() == expected[qtype]


def test_bad_input_errors():
    with pytest.raises(QuantizeError, match="multiple of 256"):
        quants.quantize(np.zeros((4, 576), np.float32), QT.Q4_K)
    with pytest.raises(ConfigError, match="Q4_K"):
        quants.quantize(np.zeros((4, 256), np.float32), QT.TQ1_0)   # a type releaser does not write
    bad = np.zeros((1, 256), np.float32)
    bad[0, 5] = np.nan
    with pytest.raises(QuantizeError, match="NaN"):
        quants.quantize(bad, QT.Q6_K)
    with pytest.raises(QuantizeError, match="no rows"):
        quants.quantize(np.zeros((3, 0), np.float32), QT.Q8_0)


def test_scalar_helpers_match_c_semantics():
    rng = np.random.default_rng(5)
    values = np.concatenate([
        rng.standard_normal(20000) * 10.0 ** rng.integers(-9, 6, 20000),
        np.array([0.5, 1.5, 2.5, -0.5, -2.5, 65504.0, 65519.9, 65520.0, 6.1e-5, 2.0 ** -25, 3 * 2.0 ** -26, 1e-30]),
    ]).astype(np.float32)
    with np.errstate(over="ignore"):
        expected_f16 = values.astype(np.float16).astype(np.float32)
    got_f16 = np.array([kquants.fp16_round(v) for v in values], np.float32)
    np.testing.assert_array_equal(got_f16, expected_f16)
    # nearest_int: ggml's bit trick evaluated with numpy's float32 view, including arguments beyond 2**22
    big = np.concatenate([values[np.abs(values) < 1e9], np.array([4194303.5, -4194304.0, 1e7, -3e8, np.inf],
                                                                   np.float32)]).astype(np.float32)
    bits = (big + np.float32(12582912.0)).view(np.int32)
    expected = (bits & 0x007FFFFF) - 0x00400000
    got = np.array([kquants.nearest_int(v) for v in big])
    np.testing.assert_array_equal(got, expected)
    assert kquants.nearest_int(np.float32(np.nan)) == 0
