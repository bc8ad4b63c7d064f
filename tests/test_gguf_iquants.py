"""IQ4_NL and IQ4_XS (releaser.gguf.iquants) against llama.cpp's own ``llama-quantize`` (tests/build_llama_tools.sh):

* whole files: a tiny Qwen3 (n_gqa 4: attn_v takes Q5_K; FFN width 320: IQ4_XS falls back to IQ4_NL, Q5_K to Q5_1)
  whose every matrix starts with edge rows (zeros, constant, one outlier, huge, tiny, ties, signed zeros), exported
  by ``releaser gguf`` with and without an importance matrix, equal llama-quantize's files made from llama.cpp's own
  F32 conversion, tensor for tensor (names, types, bytes);
* rows narrower than a super block (96 and 352 wide) and a synthetic imatrix with zero, huge and all-zero weights;
* dequantization: gguf-py's (what the quality stage and ``gguf-fix`` use) equals C's dequantize_row_iq4_nl/xs
  written out here, on llama.cpp's bytes;
* best_index (C's binary search over kvalues_iq4nl) on every corner, round-trip error, the mixes' rules.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

from releaser.gguf import export_gguf, iquants, quants
from releaser.gguf.imatrix_weights import load_imatrix
from releaser.gguf.mixes import ModelShape, TensorDesc, tensor_types
from releaser_testing import tiny_family_model

from test_gguf_imatrix import synthetic_entries, write_imatrix
from test_gguf_quants import with_edge_rows

QT = gguf.GGMLQuantizationType
IQ4 = ["IQ4_NL", "IQ4_XS"]
KV = iquants.KVALUES_IQ4NL.astype(np.int8)


def _tools_and_oracle():
    """llama.cpp's test helpers (a failure in CI, a skip elsewhere), imported by the oracle tests only."""
    import gguf_oracle

    return gguf_oracle


# -- whole files: releaser gguf against llama-quantize -----------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory, smollm2):
    """A tiny Qwen3 (8 layers: the ffn_down rule of the first n_layer/8 layers; n_gqa 4) with edge rows in every
    matrix, its F32 conversion by llama.cpp, and a synthetic imatrix for it."""
    from safetensors.numpy import load_file, save_file

    o = _tools_and_oracle()
    root = tmp_path_factory.mktemp("iquants")
    path = tiny_family_model(root / "qwen3", "qwen3", layers=8, hidden=256, intermediate=320, heads=4, kv_heads=1,
                             head_dim=64, tied=False)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2 / f, path / f)
    weights = path / "model.safetensors"
    tensors = load_file(weights)
    save_file({k: with_edge_rows(v.copy()) if v.ndim == 2 else v for k, v in tensors.items()}, weights,
              metadata={"format": "pt"})
    f32 = o.convert_hf(path, root / "qwen3-F32.gguf", "f32")
    shapes = {t.name: t.data.shape for t in gguf.GGUFReader(f32).tensors
              if t.data.ndim == 2 and t.name != "token_embd.weight"}
    write_imatrix(root / "imatrix.gguf", synthetic_entries(shapes))
    return root, path, f32


@pytest.mark.slow
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
def test_files_equal_llama_quantize(model, llama_tools, with_imatrix):
    o = _tools_and_oracle()
    root, path, f32 = model
    imatrix = root / "imatrix.gguf" if with_imatrix else None
    out = root / f"ours-{with_imatrix}"
    result = export_gguf(path, out, IQ4, name="tiny", imatrix=imatrix)
    for quant in IQ4:
        ref = root / f"ref-{quant}-{with_imatrix}.gguf"
        args = ["--imatrix", str(imatrix)] if imatrix else []
        proc = subprocess.run([str(llama_tools / "llama-quantize"), *args, str(f32), str(ref), quant, "2"],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        mine, theirs = o.tensors(result.files[quant][0]), o.tensors(ref)
        assert {k: v[0] for k, v in mine.items()} == {k: v[0] for k, v in theirs.items()}   # names and types
        assert [k for k in mine if mine[k][1] != theirs[k][1]] == []                          # bytes
        assert o.keys(result.files[quant][0], "general.file_type") == o.keys(ref, "general.file_type")
        assert o.keys(result.files[quant][0], "quantize.") == o.keys(ref, "quantize.")
        types = result.tensor_types[quant]
        assert types["blk.0.attn_v.weight"] == "Q5_K" and types["output.weight"] == "Q6_K"   # n_gqa 4; output
        assert types["blk.3.ffn_down.weight"] == "IQ4_NL"                                     # 320 wide
        assert types["blk.0.ffn_down.weight"] == ("IQ4_NL" if imatrix else "Q5_1")   # Q5_K without an imatrix
        assert types["blk.0.ffn_up.weight"] == quant
    if not with_imatrix:   # the card's rows and its pick guide name the I-quants
        from releaser.card import render_card

        # the checkout's template (an editable install may map releaser.templates to another checkout)
        card = render_card(out, template=Path(__file__).parents[1] / "templates" / "cards" / "gguf.md.j2")
        assert "| tiny-IQ4_XS.gguf | IQ4_XS |" in card and "smaller than Q4_K_S; best made with an importance matrix" in card, card
        assert "IQ4_XS and IQ4_NL are I-quants: each weight is an index into a fixed table" in card, card


# -- rows narrower than a super block, per tensor ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """An F32 GGUF of one llama layer with 352- and 96-wide rows (IQ4_XS falls back to IQ4_NL) and edge rows, and an
    imatrix with zero, huge and all-zero weights."""
    from test_gguf_quants import tiny_tensors, write_f32_gguf

    root = tmp_path_factory.mktemp("iquants-narrow")
    rng = np.random.default_rng(21)
    tensors = tiny_tensors(layers=1, ff=352)
    small = rng.standard_t(3, (352, 96)).astype(np.float32) * 0.05   # ffn_gate: its shape is not checked
    small[0] = 0.0
    small[1] = 0.37
    small[2, 50] = 40.0
    small[3, :32] = -0.0
    small[4, 32:64] = 1e-16   # a block below GROUP_MAX_EPS
    tensors["blk.0.ffn_gate.weight"] = small
    write_f32_gguf(root / "f32.gguf", tensors)
    entries = synthetic_entries({n: a.shape for n, a in tensors.items() if a.ndim == 2 and n != "token_embd.weight"})
    write_imatrix(root / "imatrix.gguf", entries)
    return root, tensors


@pytest.mark.slow
@pytest.mark.parametrize("quant", IQ4)
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
def test_narrow_rows_equal_llama_quantize(narrow, llama_tools, quant, with_imatrix):
    o = _tools_and_oracle()
    root, tensors = narrow
    ref = root / f"ref-{quant}-{with_imatrix}.gguf"
    args = ["--imatrix", str(root / "imatrix.gguf")] if with_imatrix else []
    proc = subprocess.run([str(llama_tools / "llama-quantize"), "--pure", *args, str(root / "f32.gguf"), str(ref),
                           quant, "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    im = load_imatrix(root / "imatrix.gguf") if with_imatrix else None
    found = {}
    for name, (qtype, theirs) in o.tensors(ref).items():
        qtype = QT(qtype)
        found[name] = qtype
        if qtype == QT.F32:
            continue
        w = im.for_tensor(name, tensors[name].shape) if im else None
        assert quants.quantize(tensors[name], qtype, w).tobytes() == theirs, f"{name} as {qtype.name}"
        expected = dequantize_c(np.frombuffer(theirs, np.uint8).reshape(tensors[name].shape[0], -1), qtype)
        np.testing.assert_array_equal(quants.dequantize(np.frombuffer(theirs, np.uint8).reshape(
            tensors[name].shape[0], -1), qtype), expected)
    assert found["blk.0.ffn_down.weight"] == found["blk.0.ffn_gate.weight"] == QT.IQ4_NL   # 352 and 96 wide
    assert found["blk.0.ffn_up.weight"] == QT[quant]


# -- dequantization: C's formula ---------------------------------------------------------------------------------------
def dequantize_c(raw: np.ndarray, qtype: QT) -> np.ndarray:
    """ggml's dequantize_row_iq4_nl / dequantize_row_iq4_xs, written out: [rows, bytes] -> float32 [rows, n]."""
    rows = raw.shape[0]
    if qtype == QT.IQ4_NL:
        b = raw.reshape(-1, 18)
        d = b[:, :2].copy().view("<f2").astype(np.float32)
        qs = b[:, 2:]
        idx = np.concatenate([qs & 0xF, qs >> 4], axis=1)
        return (d * KV[idx].astype(np.float32)).reshape(rows, -1)
    assert qtype == QT.IQ4_XS
    b = raw.reshape(-1, 136)
    d = b[:, :2].copy().view("<f2").astype(np.float32)
    scales_h = b[:, 2:4].copy().view("<u2").astype(np.int32)
    out = np.empty((b.shape[0], 256), np.float32)
    for ib in range(8):
        ls = ((b[:, 4 + ib // 2].astype(np.int32) >> (4 * (ib % 2))) & 0xF) | (((scales_h[:, 0] >> (2 * ib)) & 3) << 4)
        dl = d[:, 0] * (ls - 32).astype(np.float32)
        qs = b[:, 8 + 16 * ib:8 + 16 * ib + 16]
        out[:, 32 * ib:32 * ib + 16] = dl[:, None] * KV[qs & 0xF].astype(np.float32)
        out[:, 32 * ib + 16:32 * ib + 32] = dl[:, None] * KV[qs >> 4].astype(np.float32)
    return out.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [QT.IQ4_NL, QT.IQ4_XS], ids=lambda t: t.name)
def test_dequantize_is_c_formula(qtype):
    rng = np.random.default_rng(8)
    x = with_edge_rows(rng.standard_normal((16, 512)).astype(np.float32))
    raw = quants.quantize(x, qtype)
    assert raw.dtype == np.uint8 and raw.shape == (16, 512 // quants.block_size(qtype) * quants.type_size(qtype))
    np.testing.assert_array_equal(quants.dequantize(raw, qtype), dequantize_c(raw, qtype))
    rand = rng.integers(0, 256, raw.shape, dtype=np.uint8)   # any bytes with finite scales
    rand.reshape(-1, quants.type_size(qtype))[:, 1] &= 0x3B
    np.testing.assert_array_equal(quants.dequantize(rand, qtype), dequantize_c(rand, qtype))


# -- best_index, round trip, edge blocks -------------------------------------------------------------------------------
def best_index_int8(x: np.float32) -> int:
    """ggml's best_index_int8(16, kvalues_iq4nl, x), as written in C (float32 arithmetic)."""
    val = KV.astype(np.float32)
    if x <= val[0]:
        return 0
    if x >= val[15]:
        return 15
    ml, mu = 0, 15
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < val[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if np.float32(x - val[mu - 1]) < np.float32(val[mu] - x) else mu


def test_best_index_is_c_binary_search():
    rng = np.random.default_rng(3)
    levels = KV.astype(np.float32)
    mids = (levels[:-1] + levels[1:]) / np.float32(2)
    xs = np.concatenate([rng.uniform(-140, 130, 3000), levels, mids, np.nextafter(mids, np.float32(np.inf)),
                         np.nextafter(mids, np.float32(-np.inf)), [-1e30, 1e30, -np.inf, np.inf, 0.0, -0.0]])
    xs = xs.astype(np.float32)
    assert [iquants.best_index(v) for v in xs] == [best_index_int8(v) for v in xs]


def test_round_trip_and_edge_blocks():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((32, 512)).astype(np.float32)
    for qtype, bound in ((QT.IQ4_NL, 0.11), (QT.IQ4_XS, 0.11)):
        y = quants.dequantize(quants.quantize(x, qtype), qtype)
        rel = float(np.sqrt(np.mean((x - y) ** 2)) / np.sqrt(np.mean(x ** 2)))
        assert rel < bound, (qtype.name, rel)
        e = with_edge_rows(x[:13].copy())
        raw = quants.quantize(e, qtype)
        ye = quants.dequantize(raw, qtype)
        assert np.all(ye[0, :256] == 0.0) and np.all(np.isfinite(ye))
        assert abs(ye[11, 100] - 50.0) <= 0.15 * 50.0
        assert np.abs(ye[1, :256] - 0.37).max() < 0.02
    # an all-zero super-block: IQ4_XS stores d = -0.0 (C's -max_scale/32), IQ4_NL +0.0; every index is 8 (level 1)
    zeros = np.zeros((1, 256), np.float32)
    xs, nl = quants.quantize(zeros, QT.IQ4_XS)[0], quants.quantize(zeros, QT.IQ4_NL)[0]
    assert xs[:8].tobytes() == b"\x00\x80\xaa\xaa\x00\x00\x00\x00" and np.all(xs[8:] == 0x88)
    assert nl.reshape(8, 18)[:, :2].tobytes() == bytes(16) and np.all(nl.reshape(8, 18)[:, 2:] == 0x88)


def test_weights_change_the_bytes_and_are_checked():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 512)).astype(np.float32)
    w = (rng.random(512) ** 4 * 10).astype(np.float32)
    for qtype in (QT.IQ4_NL, QT.IQ4_XS):
        assert quants.quantize(x, qtype, w).tobytes() != quants.quantize(x, qtype).tobytes()
        with pytest.raises(quants.QuantizeError, match="one weight per column"):
            quants.quantize(x, qtype, w[:256])
    with pytest.raises(quants.QuantizeError, match="multiple of 256"):
        quants.quantize(x[:, :96], QT.IQ4_XS)
    assert quants.quantize(x[:, :96], QT.IQ4_NL).shape == (8, 3 * 18)


@pytest.mark.parametrize("quant", IQ4)
def test_mix_rules(quant):
    """llama.cpp's llama_tensor_get_type for the IQ4 mixes: output Q6_K (Q8_0 when not 256-divisible), attn_v Q5_K
    from n_gqa 4, the first eighth of ffn_down Q5_K without an imatrix, attn_output Q5_K in 8-expert models, and
    the fallbacks: IQ4_XS -> IQ4_NL (rows not a multiple of 256), F16 (not a multiple of 32)."""
    def desc(name, ne0=256):
        return TensorDesc(name, ne0, 2)

    tensors = [desc("token_embd.weight"), desc("output.weight")]
    for i in range(8):
        tensors += [desc(f"blk.{i}.attn_v.weight"), desc(f"blk.{i}.attn_output.weight"),
                    desc(f"blk.{i}.ffn_down.weight", 352), desc(f"blk.{i}.ffn_up.weight", 336)]
    base = QT[quant]
    narrow = QT.IQ4_NL   # 352 wide
    for gqa, has_imatrix, n_expert in ((1, False, 0), (4, False, 0), (4, True, 0), (1, True, 8)):
        shape = ModelShape(8, 4 * gqa, 4, n_expert=n_expert)
        got = dict(zip([t.name for t in tensors], tensor_types(tensors, quant, shape, has_imatrix)))
        assert got["output.weight"] == QT.Q6_K and got["token_embd.weight"] == base
        assert got["blk.0.attn_v.weight"] == (QT.Q8_0 if n_expert == 8 else QT.Q5_K if gqa >= 4 else base)
        assert got["blk.0.attn_output.weight"] == (QT.Q5_K if n_expert == 8 else base)
        assert got["blk.0.ffn_down.weight"] == (narrow if has_imatrix else QT.Q5_1)   # Q5_K -> Q5_1 at 352
        assert got["blk.1.ffn_down.weight"] == narrow
        assert got["blk.1.ffn_up.weight"] == QT.F16                                    # 336: no 32-block type
    wide = tensor_types([desc("output.weight", 288)], quant, ModelShape(8, 4, 4))
    assert wide == [QT.Q8_0]
