"""imatrix-weighted quantization (``releaser gguf --imatrix``, releaser.gguf.kquants_imatrix) against llama.cpp's own
``llama-quantize --imatrix`` with the same file (tests/build_llama_tools.sh builds it):

* SmolLM2-135M with a real imatrix from ``llama-imatrix``: our export's tensors equal llama-quantize's (576-wide rows
  take the weighted Q4_0/Q5_0/Q5_1 fallbacks, the 1536-wide ffn_down the K-quants, Q4_0 turns the first ffn_down
  layers into Q4_1), with its ``quantize.imatrix.*`` keys; the legacy ``.dat`` format reads the same way;
* a tiny 256-wide model (every K-quant type in every mix) whose every matrix starts with edge rows (zeros, constant,
  one outlier, huge, tiny, ties), with a synthetic imatrix holding zero, huge and all-zero weights, a zero count and a
  missing entry;
* a tiny mixture of experts: one weight row per expert;
* bad input: an imatrix of another model (names or widths), a damaged file, Q2_K_S without an imatrix.
"""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

from releaser.cli import app
from releaser.errors import ConfigError
from releaser.gguf import export_gguf, kernels, quants
from releaser.gguf.imatrix_weights import ImatrixError, load_imatrix
from releaser.gguf.options import GGUFOptions
from releaser.gguf.reader import GGUFFile
from releaser_testing import tiny_family_model, tiny_model

import gguf_oracle as o  # noqa: E402 - skips (outside CI) without llama-cpp-python
from test_gguf_quants import tiny_tensors, write_f32_gguf

pytestmark = pytest.mark.slow  # external oracles

QT = gguf.GGMLQuantizationType
SMOL_QUANTS = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q4_0"]
TINY_FTYPES = ["Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
               "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
IMATRIX_KEYS = ("quantize.imatrix.file", "quantize.imatrix.dataset", "quantize.imatrix.entries_count",
                "quantize.imatrix.chunks_count")


def llama_quantize(tools, src, dst, ftype: str, imatrix) -> None:
    proc = subprocess.run([str(tools / "llama-quantize"), "--imatrix", str(imatrix), str(src), str(dst), ftype, "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


def write_imatrix(path, entries: dict[str, tuple[np.ndarray, np.ndarray]], dataset: str = "synthetic.txt",
                  chunks: int = 7) -> None:
    """A GGUF imatrix as llama-imatrix writes one: name -> (in_sum2 [n_experts * n_per_row], counts [n_experts])."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", [dataset])
    w.add_uint32("imatrix.chunk_count", chunks)
    w.add_uint32("imatrix.chunk_size", 512)
    for name, (sums, counts) in entries.items():
        w.add_tensor(name + ".in_sum2", np.asarray(sums, np.float32).reshape(len(counts), -1))
        w.add_tensor(name + ".counts", np.asarray(counts, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def synthetic_entries(shapes: dict[str, tuple[int, ...]], seed: int = 9) -> dict:
    """Heavy-tailed per-column sums with zeros and one huge column; one matrix all zeros, one with a count of 0."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, (name, shape) in enumerate(sorted(shapes.items())):
        n_mat = shape[0] if len(shape) == 3 else 1
        sums = (rng.random(n_mat * shape[-1]) ** 4 * 100).astype(np.float32)
        sums[::17] = 0.0
        sums[5] = 1e6
        counts = np.full(n_mat, 3584.0, np.float32)
        if i == 1:
            sums[:] = 0.0          # every weight 0: the searches' sums of weights are 0
        if i == 2 or n_mat > 1:
            counts[-1] = 0.0       # llama-quantize then uses weights of 1
        out[name] = (sums, counts)
    return out


def assert_same_tensors(ours_path, theirs_path) -> None:
    ours, theirs = o.tensors(ours_path), o.tensors(theirs_path)
    assert {k: v[0] for k, v in ours.items()} == {k: v[0] for k, v in theirs.items()}   # names and types
    assert [k for k in ours if ours[k][1] != theirs[k][1]] == []                          # bytes


# -- SmolLM2 with llama-imatrix's own imatrix --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol(tmp_path_factory, smollm2, llama_tools):
    """Our F32 GGUF of SmolLM2 (llama-quantize's input), its imatrix by llama-imatrix (GGUF and legacy .dat) and our
    export of SMOL_QUANTS with the GGUF imatrix."""
    from releaser.quality.text import BUILTIN   # any text will do here (a release never calibrates on it)

    root = tmp_path_factory.mktemp("imatrix-smollm2")
    f32 = export_gguf(smollm2, root, ["F32"], name="SmolLM2").files["F32"][0]
    for fmt in ("gguf", "dat"):
        proc = subprocess.run([str(llama_tools / "llama-imatrix"), "-m", str(f32), "-f", str(BUILTIN), "-c", "128",
                               "--chunks", "4", "-t", "2", "--no-ppl", "--output-format", fmt,
                               "-o", str(root / f"imatrix.{fmt}")], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    ours = export_gguf(smollm2, root / "ours", SMOL_QUANTS, name="SmolLM2", imatrix=str(root / "imatrix.gguf"))
    return root, f32, ours


@pytest.mark.parametrize("quant", SMOL_QUANTS)
def test_smollm2_equals_llama_quantize_imatrix(smol, llama_tools, quant):
    root, f32, ours = smol
    ref = root / f"ref-{quant}.gguf"
    llama_quantize(llama_tools, f32, ref, quant, root / "imatrix.gguf")
    assert_same_tensors(ours.files[quant][0], ref)
    mine, theirs = o.keys(ours.files[quant][0], "quantize."), o.keys(ref, "quantize.")
    assert mine == theirs and set(mine) == set(IMATRIX_KEYS), (mine, theirs)
    assert mine["quantize.imatrix.entries_count"] == 210 and mine["quantize.imatrix.chunks_count"] == 4
    types = ours.tensor_types[quant]
    if quant == "Q4_0":   # with an imatrix, llama-quantize guards the first n_layer/8 ffn_down layers with Q4_1
        assert [types[f"blk.{i}.ffn_down.weight"] for i in range(4)] == ["Q4_1"] * 3 + ["Q4_0"]


def test_smollm2_weights_change_the_bytes(smol):
    """The oracle used the imatrix too: the weighted tensors differ from the plain quantization of the same data."""
    root, f32, ours = smol
    data = GGUFFile(f32).dequantize("blk.7.ffn_down.weight")
    im = load_imatrix(root / "imatrix.gguf")
    tensors = o.tensors(ours.files["Q4_K_M"][0])
    qtype = QT(tensors["blk.7.ffn_down.weight"][0])
    weighted = quants.quantize(data, qtype, im.for_tensor("blk.7.ffn_down.weight", data.shape)).tobytes()
    assert weighted == tensors["blk.7.ffn_down.weight"][1]
    assert weighted != quants.quantize(data, qtype).tobytes()
    assert ours.imatrix["quantize.imatrix.file"] == str(root / "imatrix.gguf")


def test_legacy_dat_imatrix_reads_as_llama_quantize_reads_it(smol, llama_tools):
    root, f32, _ = smol
    dat, ggf = load_imatrix(root / "imatrix.dat"), load_imatrix(root / "imatrix.gguf")
    assert sorted(dat.weights) == sorted(ggf.weights) and dat.chunk_count == ggf.chunk_count == 4
    for name in ggf.weights:
        np.testing.assert_allclose(dat.weights[name], ggf.weights[name], rtol=1e-5)
    ref = root / "ref-dat-Q4_K_M.gguf"
    llama_quantize(llama_tools, f32, ref, "Q4_K_M", root / "imatrix.dat")
    theirs = o.tensors(ref)
    f = GGUFFile(f32)
    for name in ("blk.0.attn_v.weight", "blk.0.ffn_down.weight", "blk.29.ffn_gate.weight", "blk.29.ffn_down.weight"):
        data = f.dequantize(name)
        qtype = QT(theirs[name][0])
        assert quants.quantize(data, qtype, dat.for_tensor(name, data.shape)).tobytes() == theirs[name][1], name


# -- a tiny 256-wide model: every K-quant type, edge rows, edge weights ------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("imatrix-tiny")
    tensors = tiny_tensors(layers=8)   # n_layer / 8 = 1: Q4_0/Q5_0 guard blk.0.ffn_down
    write_f32_gguf(root / "f32.gguf", tensors)
    entries = synthetic_entries({n: a.shape for n, a in tensors.items() if a.ndim == 2 and n != "token_embd.weight"})
    write_imatrix(root / "full.gguf", entries)
    del entries["blk.3.attn_k.weight"]   # llama-quantize quantizes a tensor without an entry without weights
    write_imatrix(root / "imatrix.gguf", entries)
    return root, tensors, {}


@pytest.mark.parametrize("ftype", TINY_FTYPES)
def test_tiny_every_type_equals_llama_quantize_imatrix(tiny, llama_tools, ftype):
    root, tensors, cache = tiny
    ref = root / f"ref-{ftype}.gguf"
    imatrix = root / "imatrix.gguf"
    if ftype == "Q2_K_S":   # ... but not a Q2_K tensor of a Q2_K_S file: it refuses (so do we: test_q2_k_s_needs...)
        proc = subprocess.run([str(llama_tools / "llama-quantize"), "--imatrix", str(imatrix), str(root / "f32.gguf"),
                               str(ref), ftype, "2"], capture_output=True, text=True, timeout=600)
        assert proc.returncode != 0 and "Missing importance matrix for tensor blk.3.attn_k.weight" in proc.stdout + \
            proc.stderr
        imatrix = root / "full.gguf"
    llama_quantize(llama_tools, root / "f32.gguf", ref, ftype, imatrix)
    im = load_imatrix(imatrix)
    seen = set()
    for name, (qtype, theirs) in o.tensors(ref).items():
        qtype = QT(qtype)
        seen.add(qtype)
        if qtype == QT.F32:
            continue
        key = (name, qtype, imatrix.name)
        if key not in cache:
            w = im.for_tensor(name, tensors[name].shape)
            cache[key] = quants.quantize(tensors[name], qtype, w).view(np.uint8).tobytes()
        assert cache[key] == theirs, f"{name} as {qtype.name} differs from llama-quantize --imatrix"
    main = ftype[:4] if ftype[-2:] in ("_S", "_M", "_L") else ftype   # the mix's default type is in the file
    assert QT[main] in seen
    if ftype in ("Q4_0", "Q5_0"):   # the imatrix-only guard of the first ffn_down layers
        assert QT[main.replace("_0", "_1")] in seen


# -- mixture of experts: one weight row per expert (and Q2_K_S with n_gqa 4) -------------------------------------------
def test_moe_per_expert_weights_equal_llama_quantize(tmp_path, smollm2, llama_tools):
    model = tiny_family_model(tmp_path / "moe", "qwen3moe", layers=1, hidden=256, intermediate=256, heads=4,
                              kv_heads=1, head_dim=64, moe_intermediate_size=256)   # n_gqa 4: Q2_K_S's attn_v rule
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2 / f, model / f)
    f32 = export_gguf(model, tmp_path, ["F32"], name="moe").files["F32"][0]
    shapes = {n: t.shape for n, t in GGUFFile(f32).tensors.items() if len(t.shape) >= 2 and n != "token_embd.weight"
              and "ffn_gate_inp" not in n}
    assert shapes["blk.0.ffn_down_exps.weight"] == (4, 256, 256)
    write_imatrix(tmp_path / "imatrix.gguf", synthetic_entries(shapes))
    ours = export_gguf(model, tmp_path / "ours", ["Q4_K_M", "Q2_K_S"], name="moe", imatrix=tmp_path / "imatrix.gguf")
    for quant in ("Q4_K_M", "Q2_K_S"):
        ref = tmp_path / f"ref-{quant}.gguf"
        llama_quantize(llama_tools, f32, ref, quant, tmp_path / "imatrix.gguf")
        assert_same_tensors(ours.files[quant][0], ref)
    assert ours.tensor_types["Q2_K_S"]["blk.0.attn_v.weight"] == "Q4_K"


def test_expert_chunks_stop_at_expert_boundaries():
    rng = np.random.default_rng(4)
    data = rng.standard_normal((3, 40, 512)).astype(np.float32)
    w = rng.random((3, 512)).astype(np.float32)
    for qtype in (QT.Q4_K, QT.Q5_0):
        one = quants.quantize(data, qtype, w)
        per_expert = np.stack([quants.quantize(data[e], qtype, w[e]) for e in range(3)])
        assert one.tobytes() == per_expert.tobytes()
        kernels.K_CHUNK_ELEMENTS, saved = 512 * 16, kernels.K_CHUNK_ELEMENTS   # chunks of 16 rows: 40 = 16+16+8
        try:
            with ThreadPoolExecutor(2) as pool:
                futures = kernels.submit(pool, data, qtype, w)
                chunked = kernels.collect(futures)
        finally:
            kernels.K_CHUNK_ELEMENTS = saved
        assert len(futures) == 9 and chunked.tobytes() == one.tobytes()


# -- rows: what the weights do -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", quants.WEIGHTED_TYPES, ids=lambda t: t.name)
def test_edge_rows_with_weights(qtype):
    """Zeros stay zeros, a constant row stays near constant (within 5%; on IQ3's grids, where the weights are), one outlier survives, all-zero weights stay finite (the
    bytes of such rows are llama.cpp's: the tiny model's matrices start with them); and
    the weights steer the error: with weights favouring a few columns, their weighted error is below the plain
    quantization's."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((6, 512)).astype(np.float32)
    x[0] = 0.0
    x[1] = 0.37
    x[2, 100] = 50.0
    w = np.where(rng.random(512) < 0.1, 100.0, 0.01).astype(np.float32)
    w[100] = 100.0   # an outlier in an important column (one in an unimportant column may be clipped, as in C)
    y = quants.dequantize(quants.quantize(x, qtype, w), qtype)
    assert np.all(y[0] == 0.0)
    if qtype in (QT.IQ3_S, QT.IQ3_XXS, QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ1_S, QT.IQ1_M):   # grids hold no constant
        # row: near it where the weights are (IQ2_XXS: 12%; IQ1_S 8%, IQ1_M 11%)
        bound = 0.1 if qtype in (QT.IQ3_S, QT.IQ3_XXS) else 0.15
        assert np.sqrt((w * (y[1] - 0.37) ** 2).sum() / w.sum()) < bound * 0.37
    else:
        assert np.abs(y[1] - 0.37).max() < 0.05 * 0.37
    assert abs(y[2, 100] - 50.0) < 0.15 * 50.0
    assert np.all(np.isfinite(quants.dequantize(quants.quantize(x, qtype, np.zeros(512, np.float32)), qtype)))
    uniform = np.ones(512, np.float32) if qtype in quants.WEIGHTS_REQUIRED else None   # IQ2_XXS/XS need weights
    plain = quants.dequantize(quants.quantize(x, qtype, uniform), qtype)
    err_w = float((w * (x[3:] - y[3:]) ** 2).sum())
    err_plain = float((w * (x[3:] - plain[3:]) ** 2).sum())
    assert err_w < 0.9 * err_plain, (err_w, err_plain)


def test_types_without_weights_ignore_them():
    x = np.random.default_rng(2).standard_normal((4, 256)).astype(np.float32)
    w = np.ones(256, np.float32)
    for qtype in (QT.Q8_0, QT.F16, QT.F32):
        assert quants.quantize(x, qtype, w).tobytes() == quants.quantize(x, qtype).tobytes()


def test_bad_weights_for_quantize():
    x = np.zeros((4, 256), np.float32)
    with pytest.raises(quants.QuantizeError, match="one weight per column"):
        quants.quantize(x, QT.Q4_K, np.ones(128, np.float32))
    with pytest.raises(quants.QuantizeError, match="NaN or infinite"):
        quants.quantize(x, QT.Q4_K, np.full(256, np.inf, np.float32))


# -- bad input ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def small(tmp_path, smollm2):
    path = tiny_model(tmp_path / "model", "llama", layers=2, hidden=64, intermediate=128, vocab=49152)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2 / f, path / f)
    return path


def _one_line(res) -> str:
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    return lines[0]


def test_imatrix_of_another_model_is_refused(small, tmp_path):
    write_imatrix(tmp_path / "other.gguf", {"blk.0.attn_qkv.weight": (np.ones(64), np.ones(1)),
                                            "blk.0.ffn_down_exps.weight": (np.ones(128), np.ones(1))})
    with pytest.raises(ImatrixError, match="has no entry for any tensor of this model"):
        export_gguf(small, tmp_path / "out", ["Q4_0"], imatrix=tmp_path / "other.gguf")
    write_imatrix(tmp_path / "wide.gguf", {"blk.0.attn_q.weight": (np.ones(128), np.ones(1))})
    res = CliRunner().invoke(app, ["gguf", str(small), "-o", str(tmp_path / "out"), "--quant", "Q4_0",
                                   "--imatrix", str(tmp_path / "wide.gguf")])
    line = _one_line(res)
    assert "blk.0.attn_q.weight has 128 values but the tensor has 64 columns" in line, line
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_token_embedding_entry_of_another_width_is_ignored_as_llama_cpp_does(small, tmp_path):
    entries = {"token_embd.weight": (np.ones(7), np.ones(1)), "blk.0.attn_q.weight": (np.ones(64), np.ones(1))}
    write_imatrix(tmp_path / "im.gguf", entries)
    result = export_gguf(small, tmp_path / "out", ["Q4_0"], imatrix=tmp_path / "im.gguf")
    assert result.imatrix["quantize.imatrix.entries_count"] == 2


def test_damaged_imatrix_files(small, tmp_path):
    write_imatrix(tmp_path / "im.gguf", {"blk.0.attn_q.weight": (np.ones(64), np.ones(1))})
    data = (tmp_path / "im.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-40])
    (tmp_path / "junk.dat").write_bytes(b"\x05\x00\x00\x00junk")
    (tmp_path / "empty.dat").write_bytes(b"")
    with pytest.raises(ImatrixError, match="truncated"):
        load_imatrix(tmp_path / "cut.gguf")
    for name in ("junk.dat", "empty.dat"):
        with pytest.raises(ImatrixError, match="not a readable imatrix file"):
            load_imatrix(tmp_path / name)
    with pytest.raises(ImatrixError, match="does not exist"):
        load_imatrix(tmp_path / "missing.gguf")
    write_imatrix(tmp_path / "nan.gguf", {"blk.0.attn_q.weight": (np.full(64, np.nan), np.ones(1))})
    with pytest.raises(ImatrixError, match="non-finite"):
        load_imatrix(tmp_path / "nan.gguf")
    res = CliRunner().invoke(app, ["gguf", str(small), "-o", str(tmp_path / "out"), "--quant", "Q4_K_M",
                                   "--imatrix", str(tmp_path / "junk.dat")])
    assert "not a readable imatrix file" in _one_line(res)


def test_q2_k_s_needs_an_imatrix(small, tmp_path):
    """llama-quantize refuses Q2_K_S without an imatrix, and with one that misses a tensor it stores as Q2_K."""
    with pytest.raises(ConfigError, match="Q2_K_S needs an importance matrix"):
        GGUFOptions.build(quants=["Q2_K_S"])
    with pytest.raises(ConfigError, match="Q2_K_S needs an importance matrix"):
        export_gguf(small, tmp_path / "out", ["Q2_K_S"])
    res = CliRunner().invoke(app, ["gguf", str(small), "-o", str(tmp_path / "out"), "--quant", "Q2_K_S"])
    assert "--imatrix: Q2_K_S needs an importance matrix" in _one_line(res)
    # the tiny llama is 64 wide: its Q2_K tensors fall back to Q4_0 and need no imatrix, so use a 256-wide one
    wide = tiny_model(tmp_path / "wide", "llama", layers=2, hidden=256, intermediate=512, vocab=49152)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(small / f, wide / f)
    write_imatrix(tmp_path / "im.gguf", {"blk.0.attn_q.weight": (np.ones(256), np.ones(1))})
    with pytest.raises(ImatrixError, match="has no entry for blk.0.ffn_down.weight, which Q2_K_S stores as Q2_K"):
        export_gguf(wide, tmp_path / "out2", ["Q2_K_S"], imatrix=tmp_path / "im.gguf")


def test_stage_records_the_imatrix_as_the_recipe_names_it(small, tmp_path):
    """A release reads the file from the recipe's folder but writes the name as the recipe gives it: the bytes do not
    depend on where the recipe lies."""
    from releaser.gguf.stage import run

    (tmp_path / "calib").mkdir()
    write_imatrix(tmp_path / "calib" / "im.gguf", {"blk.0.attn_q.weight": (np.ones(64), np.ones(1))}, chunks=3)
    result = run(GGUFOptions(quants=["Q4_0", "F16"], imatrix="calib/im.gguf"), small, tmp_path / "out", name="Tiny",
                 imatrix=tmp_path / "calib" / "im.gguf")
    keys = {"quantize.imatrix.file": "calib/im.gguf", "quantize.imatrix.dataset": "synthetic.txt",
            "quantize.imatrix.entries_count": 1, "quantize.imatrix.chunks_count": 3}
    assert result.facts["imatrix"] == keys
    assert o.keys(tmp_path / "out" / "Tiny-Q4_0.gguf", "quantize.") == keys
    assert o.keys(tmp_path / "out" / "Tiny-F16.gguf", "quantize.") == {}   # written as convert_hf_to_gguf.py does
