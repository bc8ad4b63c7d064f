"""IQ1_S and IQ1_M (releaser.gguf.iquants1) against llama.cpp's own ``llama-quantize`` (tests/build_llama_tools.sh):

* whole files: test_gguf_iquants3's tiny 8-layer Llama with a 200-token BPE vocabulary, n_gqa 4 and 352-wide FFN rows (IQ1 falls back to
  IQ4_NL there), every matrix starting with edge rows (zeros, constant, one outlier, huge, tiny, ties, signed zeros),
  its tensors given IQ1_S / IQ1_M by ``--tensor-type`` rules on a Q8_0 base, exported by ``releaser gguf`` with a
  synthetic importance matrix (zero and huge columns, one all-zero matrix) and by llama-quantize from our F32 file:
  tensor for tensor equal (names, types, bytes);
* IQ1_M without weights (llama-quantize allows it for the token embeddings and the output only);
* the IQ1_S and IQ1_M mixes (llama.cpp's very-low-bit rules: IQ2_XXS attn_output, Q2_K token embeddings and first
  ffn_down layers, Q5_K output), with the imatrix, equal llama-quantize's files;
* the refusals: the IQ1 mixes and IQ1_S / IQ1_M tensors without an imatrix (llama-quantize refuses them too), IQ1_S
  where no imatrix entry can be (the token embeddings: llama.cpp aborts);
* dequantization: gguf-py's (what the quality stage and ``gguf-fix`` use) equals C's dequantize_row_iq1_s/m written
  out here; the grid equals gguf-py's; the kernels' corner cases.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from releaser.errors import ConfigError
from releaser.gguf import export_gguf, iquants1, quants
from releaser.gguf.mixes import ModelShape, tensor_types

import test_gguf_iquants3 as iq3
from test_gguf_quants import with_edge_rows

QT = gguf.GGMLQuantizationType
model = iq3.model   # the fixture: the tiny Llama with edge rows, our F32 file of it and a synthetic imatrix
# IQ1_S and IQ1_M on every kind of tensor (ffn_down is 352 wide: IQ4_NL), IQ1_M unweighted on the token embeddings
RULES = {"name": "IQ1-rules", "base": "Q8_0", "embedding_type": "IQ1_M", "output_type": "IQ1_S",
         "tensor_types": {"attn_q": "IQ1_S", "attn_k": "IQ1_M", "attn_v": "IQ1_S", "attn_output": "IQ1_M",
                          "ffn_gate": "IQ1_S", "ffn_up": "IQ1_M", "ffn_down": "IQ1_S"}}


def _rule_args(spec: dict) -> list[str]:
    args = [a for p, t in spec["tensor_types"].items() for a in ("--tensor-type", f"{p}={t.lower()}")]
    return args + ["--token-embedding-type", spec["embedding_type"].lower(), "--output-tensor-type",
                   spec["output_type"].lower()]


@pytest.mark.slow
def test_tensors_equal_llama_quantize(model, llama_tools):
    o = iq3._oracle()
    root, path, f32 = model
    imatrix = root / "imatrix.gguf"
    result = export_gguf(path, root / "ours", [RULES], name="tiny", imatrix=imatrix, pre_tokenizer="llama-bpe")
    ref = root / "ref.gguf"
    rc, log = iq3._llama_quantize(llama_tools, ["--imatrix", imatrix, *_rule_args(RULES), f32, ref, "Q8_0", 2])
    assert rc == 0, log[-3000:]
    mine, theirs = o.tensors(result.files["IQ1-rules"][0]), o.tensors(ref)
    assert {k: v[0] for k, v in mine.items()} == {k: v[0] for k, v in theirs.items()}   # names and types
    assert [k for k in mine if mine[k][1] != theirs[k][1]] == []                          # bytes
    types = result.tensor_types["IQ1-rules"]
    assert types["token_embd.weight"] == "IQ1_M" and types["output.weight"] == "IQ1_S"
    assert types["blk.0.attn_q.weight"] == types["blk.0.attn_v.weight"] == types["blk.5.ffn_gate.weight"] == "IQ1_S"
    assert types["blk.0.attn_k.weight"] == types["blk.0.attn_output.weight"] == types["blk.5.ffn_up.weight"] == "IQ1_M"
    assert types["blk.3.ffn_down.weight"] == "IQ4_NL"                                      # 352 wide


@pytest.mark.slow
def test_iq1_m_without_weights_equals_llama_quantize(model, llama_tools):
    """llama-quantize writes IQ1_M without an imatrix for the token embeddings and the output only."""
    iq3.embeddings_and_output_equal_llama_quantize(model, llama_tools, QT.IQ1_M)


@pytest.mark.slow
def test_mixes_equal_llama_quantize(model, llama_tools):
    o = iq3._oracle()
    root, path, f32 = model
    imatrix = root / "imatrix.gguf"
    result = export_gguf(path, root / "ours-mixes", ["IQ1_S", "IQ1_M"], name="tiny", imatrix=imatrix,
                         pre_tokenizer="llama-bpe")
    for quant in ("IQ1_S", "IQ1_M"):
        ref = root / f"ref-{quant}.gguf"
        rc, log = iq3._llama_quantize(llama_tools, ["--imatrix", imatrix, f32, ref, quant, 2])
        assert rc == 0, log[-3000:]
        ours = result.files[quant][0]
        mine, theirs = o.tensors(ours), o.tensors(ref)
        assert {k: v[0] for k, v in mine.items()} == {k: v[0] for k, v in theirs.items()}   # names and types
        assert [k for k in mine if mine[k][1] != theirs[k][1]] == []                          # bytes
        assert o.keys(ours, "general.file_type") == o.keys(ref, "general.file_type")
        assert o.keys(ours, "quantize.") == o.keys(ref, "quantize.")
        types = result.tensor_types[quant]
        assert types["output.weight"] == "Q5_K" and types["token_embd.weight"] == "Q2_K"
        assert types["blk.0.attn_v.weight"] == "Q4_K"                                   # n_gqa 4
        assert types["blk.0.ffn_down.weight"] == "Q4_0" and types["blk.3.ffn_down.weight"] == "IQ4_NL"   # 352 wide
        assert types["blk.3.attn_output.weight"] == "IQ2_XXS"
        assert types["blk.3.attn_q.weight"] == types["blk.5.attn_k.weight"] == types["blk.7.ffn_up.weight"] == quant
    assert result.sizes["IQ1_S"] < result.sizes["IQ1_M"]
    from pathlib import Path

    from releaser.card import render_card

    # the checkout's template (an editable install may map releaser.templates to another checkout)
    card = render_card(root / "ours-mixes", template=Path(__file__).parents[1] / "templates" / "cards" / "gguf.md.j2")
    assert "| tiny-IQ1_M.gguf | IQ1_M |" in card and "| tiny-IQ1_S.gguf | IQ1_S |" in card, card
    assert "IQ1_M and IQ1_S are 1-bit I-quants, made with an importance matrix" in card, card


@pytest.mark.slow
def test_iq1_is_refused_without_an_imatrix(model, llama_tools):
    root, path, f32 = model
    for quant in ("IQ1_S", "IQ1_M"):
        with pytest.raises(ConfigError, match=rf"{quant} needs an importance matrix .* --imatrix FILE \(gguf.imatrix "
                                              r"in a recipe\) or choose Q2_K"):
            export_gguf(path, root / "refused", [quant], name="tiny", pre_tokenizer="llama-bpe")
        spec = {"name": f"Q8_0-{quant}", "base": "Q8_0", "tensor_types": {"ffn_up": quant}}
        with pytest.raises(ConfigError, match=rf"Q8_0-{quant} stores blk.0.ffn_up.weight as {quant}, which needs an "
                                              r"importance matrix .* --imatrix FILE"):
            export_gguf(path, root / "refused", [spec], name="tiny", pre_tokenizer="llama-bpe")
    # IQ1_S cannot be made without weights at all: the token embeddings have no imatrix entry (llama.cpp aborts)
    spec = {"name": "E", "base": "Q8_0", "embedding_type": "IQ1_S"}
    with pytest.raises(ConfigError, match=r"E stores token_embd.weight as IQ1_S, which llama.cpp cannot make "
                                          r"without importance weights .* choose another type for it"):
        export_gguf(path, root / "refused", [spec], name="tiny", imatrix=root / "imatrix.gguf",
                    pre_tokenizer="llama-bpe")
    assert not (root / "refused").exists() or not any((root / "refused").iterdir())
    for args in (["IQ1_S"], ["IQ1_M"], ["--tensor-type", "ffn_up=iq1_s", "Q8_0"],
                 ["--tensor-type", "ffn_up=iq1_m", "Q8_0"]):   # llama-quantize refuses them too
        rc, log = iq3._llama_quantize(llama_tools, [*args[:-1], f32, root / "refused.gguf", args[-1], 2])
        assert rc != 0 and "requires an importance matrix" in log, log[-2000:]


@pytest.mark.parametrize("quant", ["IQ1_S", "IQ1_M"])
def test_mix_rules(quant):
    """llama.cpp's very-low-bit branch for IQ1_S / IQ1_M: output Q5_K, token embeddings Q2_K, attn_v Q4_K from n_gqa 4
    or 4 experts (else Q2_K), the first eighth of ffn_down Q2_K, attn_output IQ2_XXS (8 experts: Q5_K), 8 experts'
    attn_k Q4_K; the mix's type elsewhere; 352-wide rows fall back to IQ4_NL (Q2_K to Q4_0)."""
    tensors = iq3._descs(ffn=352)
    default = QT[quant]
    for gqa, n_expert in ((1, 0), (4, 0), (1, 4), (1, 8)):
        got = dict(zip([t.name for t in tensors], tensor_types(tensors, quant, ModelShape(8, 4 * gqa, 4,
                                                                                          n_expert=n_expert),
                                                               has_imatrix=True)))
        assert got["output.weight"] == QT.Q5_K and got["token_embd.weight"] == QT.Q2_K
        assert got["blk.0.attn_v.weight"] == (QT.Q4_K if gqa >= 4 or n_expert >= 4 else QT.Q2_K)
        assert got["blk.2.attn_k.weight"] == (QT.Q4_K if n_expert == 8 else default)
        assert got["blk.2.attn_q.weight"] == got["blk.2.ffn_up.weight"] == got["blk.6.ffn_gate.weight"] == default
        assert got["blk.2.attn_output.weight"] == (QT.Q5_K if n_expert == 8 else QT.IQ2_XXS)
        assert [got[f"blk.{i}.ffn_down.weight"] for i in range(8)] == [QT.Q4_0] + [QT.IQ4_NL] * 7


def test_recipe_and_cli_name_the_imatrix_flag(tmp_path):
    from typer.testing import CliRunner

    from releaser.cli import app
    from releaser.gguf.options import GGUFOptions

    for quant in ("IQ1_S", "IQ1_M"):
        with pytest.raises(ConfigError, match=f"{quant} needs an importance matrix .* give one, or use Q2_K"):
            GGUFOptions.build(quants=[quant])
    res = CliRunner().invoke(app, ["gguf", str(tmp_path), "-o", str(tmp_path / "out"), "--quant", "IQ1_M"])
    assert res.exit_code != 0 and "--imatrix: IQ1_M needs an importance matrix" in " ".join(res.output.split())


# -- dequantization: C's formula ---------------------------------------------------------------------------------------
def _grid_values() -> np.ndarray:
    """iq1s_grid's bytes: the levels 0..2 of kgrid_1bit_2048 as -1, 0, 1 ([2048, 8])."""
    kgrid = np.asarray(iquants1.KGRID_1BIT_2048)
    return (((kgrid[:, None] >> (2 * np.arange(8))) & 3) - 1).astype(np.float32)


def dequantize_c(raw: np.ndarray, qtype: QT) -> np.ndarray:
    """ggml's dequantize_row_iq1_s / dequantize_row_iq1_m, written out: [rows, bytes] -> float32 [rows, n]."""
    rows = raw.shape[0]
    b = raw.reshape(-1, quants.type_size(qtype))
    grid = _grid_values()
    out = np.empty((b.shape[0], 256), np.float32)
    delta = np.float32(0.125)
    if qtype == QT.IQ1_S:
        d = b[:, :2].copy().view("<f2").astype(np.float32)[:, 0]
        qs, qh = b[:, 2:34], b[:, 34:50].copy().view("<u2").astype(np.int32)
        for ib in range(8):
            dl = d * (2 * ((qh[:, ib] >> 12) & 7) + 1).astype(np.float32)
            dlt = np.where(qh[:, ib] & 0x8000, -delta, delta).astype(np.float32)
            for l in range(4):
                idx = qs[:, 4 * ib + l].astype(np.int32) | (((qh[:, ib] >> (3 * l)) & 7) << 8)
                out[:, 32 * ib + 8 * l:32 * ib + 8 * l + 8] = dl[:, None] * (grid[idx] + dlt[:, None])
        return out.reshape(rows, -1)
    assert qtype == QT.IQ1_M
    qs, qh, sc = b[:, :32], b[:, 32:48].astype(np.int32), b[:, 48:56].copy().view("<u2").astype(np.int32)
    u16 = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0x00F0) | ((sc[:, 2] >> 4) & 0x0F00) | (sc[:, 3] & 0xF000)
    d = u16.astype(np.uint16).view("<f2").astype(np.float32)
    for ib in range(8):
        dls = [d * (2 * ((sc[:, ib // 2] >> (6 * (ib % 2) + s)) & 7) + 1).astype(np.float32) for s in (0, 3)]
        h0, h1 = qh[:, 2 * ib], qh[:, 2 * ib + 1]
        idx = [qs[:, 4 * ib] | ((h0 << 8) & 0x700), qs[:, 4 * ib + 1] | ((h0 << 4) & 0x700),
               qs[:, 4 * ib + 2] | ((h1 << 8) & 0x700), qs[:, 4 * ib + 3] | ((h1 << 4) & 0x700)]
        dlt = [np.where(h & m, -delta, delta).astype(np.float32) for h in (h0, h1) for m in (0x08, 0x80)]
        for l in range(4):
            out[:, 32 * ib + 8 * l:32 * ib + 8 * l + 8] = dls[l // 2][:, None] * (grid[idx[l]] + dlt[l][:, None])
    return out.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [QT.IQ1_S, QT.IQ1_M], ids=lambda t: t.name)
def test_dequantize_is_c_formula(qtype):
    rng = np.random.default_rng(8)
    x = with_edge_rows(rng.standard_normal((16, 512)).astype(np.float32))
    raw = quants.quantize(x, qtype, (rng.random(512) ** 4 * 10).astype(np.float32))
    assert raw.dtype == np.uint8 and raw.shape == (16, 2 * quants.type_size(qtype))
    np.testing.assert_array_equal(quants.dequantize(raw, qtype), dequantize_c(raw, qtype))
    rand = rng.integers(0, 256, raw.shape, dtype=np.uint8)   # any bytes with finite scales
    if qtype == QT.IQ1_S:
        rand.reshape(-1, quants.type_size(qtype))[:, 1] &= 0x3B
    else:
        rand.reshape(-1, quants.type_size(qtype))[:, 55] &= 0x3B
    np.testing.assert_array_equal(quants.dequantize(rand, qtype), dequantize_c(rand, qtype))


def test_grid_tables():
    """Our grid is gguf-py's (its hex table, through llama.cpp's byte values), and every level group off the grid lists
    its nearest grid points, nearest first, at 3 distances."""
    ref = gguf.quants.IQ1_S
    ref.init_grid()
    np.testing.assert_array_equal(_grid_values(), ref.grid.reshape(-1, 8).astype(np.float32))
    grid, kmap, neighbours = iquants1.tables()
    assert grid.shape == (2048, 8) and (kmap >= 0).sum() == 2048
    reachable = np.flatnonzero(((np.arange(65536)[:, None] >> (2 * np.arange(8))) & 3).max(axis=1) < 3)
    assert (kmap[reachable] != iquants1.grid_tables.__globals__["UNREACHABLE"]).all() and len(reachable) == 3 ** 8
    off = reachable[kmap[reachable] < 0]
    for u in off[[0, 7, 100, -1]]:
        pos = 2 * ((u >> (2 * np.arange(8))) & 3) + 1
        start = -kmap[u] - 1
        listed = neighbours[start + 1:start + 1 + neighbours[start]]
        d2 = ((grid.astype(int) - pos) ** 2).sum(axis=1)
        assert list(zip(d2[listed], listed)) == sorted(zip(d2[listed], listed))
        assert d2[listed[0]] == d2.min() and len(set(d2[listed])) == 3
        assert set(listed) == set(np.flatnonzero(d2 <= d2[listed[-1]]))


def test_round_trip_and_corner_cases():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((32, 512)).astype(np.float32)
    w = (rng.random(512) ** 4 * 10).astype(np.float32)
    for qtype, bound in ((QT.IQ1_S, 0.75), (QT.IQ1_M, 0.7)):
        y = quants.dequantize(quants.quantize(x, qtype, w), qtype)
        rel = float(np.sqrt(np.mean((x - y) ** 2)) / np.sqrt(np.mean(x ** 2)))
        assert rel < bound, (qtype.name, rel)
        with pytest.raises(quants.QuantizeError, match="multiple of 256"):
            quants.quantize(x[:, :96], qtype, w[:96])
        # an all-zero super-block, or one whose weights are all zero, stores zeros only
        assert not quants.quantize(np.zeros((1, 256), np.float32), qtype, w[:256]).any()
        assert not quants.quantize(x[:1, :256], qtype, np.zeros(256, np.float32)).any()
    assert quants.quantize(x, QT.IQ1_M).tobytes() != quants.quantize(x, QT.IQ1_M, w).tobytes()
    with pytest.raises(quants.QuantizeError, match="IQ1_S without importance weights"):
        quants.quantize(x, QT.IQ1_S)


def test_a_block_of_grid_points_is_found_exactly():
    """A 32-weight block made of 4 grid points (levels -1/0/1 shifted by +delta) is stored as those points with the
    +delta flag, whatever their scale; the all-zero blocks after it stay zero; it dequantizes to a multiple of itself
    (C's fudge factor 1.125 scales d)."""
    points = [1706, 1969, 1514, 465]
    levels = _grid_values()[points].reshape(-1)
    x = np.zeros((1, 256), np.float32)
    x[0, :32] = (levels + np.float32(0.125)) * np.float32(0.03)
    raw = quants.quantize(x, QT.IQ1_S, np.ones(256, np.float32))[0]
    qs, qh = raw[2:34], raw[34:50].view("<u2")
    assert [int(qs[k]) | ((int(qh[0]) >> (3 * k)) & 7) << 8 for k in range(4)] == points
    assert qh[0] >> 12 == 7 and not qh[1:].any() and not qs[4:].any()   # scale 7 of 7, +delta
    y = quants.dequantize(raw[None], QT.IQ1_S)[0]
    np.testing.assert_allclose(y[:32], x[0, :32] * (y[0] / x[0, 0]), rtol=1e-6)
