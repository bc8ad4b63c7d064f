"""IQ2_XXS, IQ2_XS and IQ2_S (releaser.gguf.iquants2) and the IQ2_XXS / IQ2_XS / IQ2_S / IQ2_M / IQ3_XXS mixes against
llama.cpp's own ``llama-quantize`` (tests/build_llama_tools.sh):

* whole files: a tiny 8-layer Llama with a 200-token BPE vocabulary, n_gqa 4 (attn_v takes Q4_K) and 352-wide FFN rows
  (the IQ2 types fall back to IQ4_NL), every matrix starting with edge rows (zeros, constant, one outlier, huge, tiny,
  ties, signed zeros), exported by ``releaser gguf`` with an importance matrix (llama-quantize refuses these mixes
  without one), equal llama-quantize's files made from our F32 file, tensor for tensor (names, types, bytes);
  the synthetic imatrix has zero columns, one huge column and an all-zero matrix;
* IQ2_S without weights (llama-quantize allows it for the token embeddings and the output only) and the types as
  ``--pure`` files (every matrix, the attention ones 256 wide);
* the refusals: the mixes, or any IQ2 tensor, without an imatrix (llama-quantize refuses them too); IQ2_XXS / IQ2_XS
  without weights at all (llama.cpp asserts them);
* dequantization: gguf-py's (what the quality stage and ``gguf-fix`` use) equals C's dequantize_row_iq2_* written out
  here; the grid tables equal gguf-py's and their neighbour lists C's rule; the mixes' rules.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from releaser.errors import ConfigError
from releaser.gguf import export_gguf, iqgrid, quants
from releaser.gguf.mixes import ModelShape, TensorDesc, tensor_types

import test_gguf_iquants3

QT = gguf.GGMLQuantizationType
MIXES = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS"]


def _oracle():
    import gguf_oracle

    return gguf_oracle


def _iquants2():
    from releaser.gguf import iquants2

    return iquants2


# -- whole files: releaser gguf against llama-quantize -----------------------------------------------------------------
model = test_gguf_iquants3.model   # the tiny Llama with edge rows, its F32 file and a synthetic imatrix (a fixture)
_llama_quantize = test_gguf_iquants3._llama_quantize


def _same_files(ours, ref):
    o = _oracle()
    mine, theirs = o.tensors(ours), o.tensors(ref)
    assert {k: v[0] for k, v in mine.items()} == {k: v[0] for k, v in theirs.items()}   # names and types
    assert [k for k in mine if mine[k][1] != theirs[k][1]] == []                          # bytes
    assert o.keys(ours, "general.file_type") == o.keys(ref, "general.file_type")
    return mine


@pytest.mark.slow
def test_files_equal_llama_quantize(model, llama_tools):
    root, path, f32 = model
    imatrix = root / "imatrix.gguf"
    result = export_gguf(path, root / "ours", MIXES, name="tiny", imatrix=imatrix, pre_tokenizer="llama-bpe")
    for quant in MIXES:
        ref = root / f"ref-{quant}.gguf"
        rc, log = _llama_quantize(llama_tools, ["--imatrix", imatrix, f32, ref, quant, 2])
        assert rc == 0, log[-3000:]
        _same_files(result.files[quant][0], ref)
        assert _oracle().keys(result.files[quant][0], "quantize.") == _oracle().keys(ref, "quantize.")
        types = result.tensor_types[quant]
        low = quant != "IQ3_XXS"
        assert types["output.weight"] == "Q5_K"
        assert types["token_embd.weight"] == ("Q2_K" if quant in ("IQ2_XXS", "IQ2_XS") else "IQ3_S")
        assert types["blk.0.attn_v.weight"] == "Q4_K"                                   # n_gqa 4
        assert types["blk.3.ffn_down.weight"] == "IQ4_NL"                                # 352 wide
        assert types["blk.0.ffn_down.weight"] == ("IQ4_NL" if quant in ("IQ2_S", "IQ2_M", "IQ3_XXS") else "Q4_0")
        default = {"IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS", "IQ2_S": "IQ2_XS", "IQ2_M": "IQ2_S"}.get(quant, "IQ3_XXS")
        assert types["blk.3.attn_output.weight"] == (
            "IQ3_S" if quant in ("IQ2_S", "IQ2_M", "IQ3_XXS") else default)
        assert types["blk.3.attn_q.weight"] == types["blk.5.attn_k.weight"] == (default if low else "IQ2_S")
    sizes = [result.sizes[q] for q in ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS")]
    assert sizes == sorted(sizes), sizes
    from pathlib import Path

    from releaser.card import render_card

    # the checkout's template (an editable install may map releaser.templates to another checkout)
    card = render_card(root / "ours", template=Path(__file__).parents[1] / "templates" / "cards" / "gguf.md.j2")
    assert "| tiny-IQ2_M.gguf | IQ2_M |" in card and "| tiny-IQ2_XXS.gguf | IQ2_XXS |" in card, card
    assert "IQ3_XXS, IQ2_M, IQ2_S, IQ2_XS, IQ2_XXS are made with an importance matrix" in card, card


@pytest.mark.slow
def test_pure_types_and_iq2_s_without_weights_equal_llama_quantize(model, llama_tools):
    """Every matrix in one type (the 352-wide ones fall back to IQ4_NL), with the imatrix; and IQ2_S without one for
    the token embeddings and the output, which llama-quantize allows."""
    root, path, f32 = model
    imatrix = root / "imatrix.gguf"
    specs = [{"name": f"P-{t}", "base": "Q8_0", "pure": True, "tensor_types": {"weight": t},
              "embedding_type": "Q8_0", "output_type": "Q8_0"} for t in ("IQ2_XXS", "IQ2_XS", "IQ2_S")]
    result = export_gguf(path, root / "ours-pure", specs, name="tiny", imatrix=imatrix, pre_tokenizer="llama-bpe")
    for spec in specs:
        t = spec["name"][2:]
        ref = root / f"ref-pure-{t}.gguf"
        rc, log = _llama_quantize(llama_tools, ["--imatrix", imatrix, "--pure", "--tensor-type", f"weight={t.lower()}",
                                                "--token-embedding-type", "q8_0", "--output-tensor-type", "q8_0",
                                                f32, ref, "Q8_0", 2])
        assert rc == 0, log[-3000:]
        mine = _same_files(result.files[spec["name"]][0], ref)
        assert mine["blk.0.attn_q.weight"][0] == mine["blk.7.ffn_up.weight"][0] == QT[t]
    ref = root / "ref-s-plain.gguf"
    rc, log = _llama_quantize(llama_tools, ["--pure", "--token-embedding-type", "iq2_s", "--output-tensor-type",
                                            "iq2_s", f32, ref, "Q8_0", 2])
    assert rc == 0, log[-3000:]
    spec = {"name": "S", "base": "Q8_0", "pure": True, "embedding_type": "IQ2_S", "output_type": "IQ2_S"}
    result = export_gguf(path, root / "ours-s", [spec], name="tiny", pre_tokenizer="llama-bpe")
    mine = _same_files(result.files["S"][0], ref)
    assert mine["token_embd.weight"][0] == mine["output.weight"][0] == QT.IQ2_S


@pytest.mark.slow
def test_imatrix_types_are_refused_without_one(model, llama_tools):
    root, path, f32 = model
    for quant, instead in (("IQ2_M", "Q2_K"), ("IQ3_XXS", "IQ3_S")):
        with pytest.raises(ConfigError, match=rf"{quant} needs an importance matrix .* --imatrix FILE \(gguf.imatrix "
                                              rf"in a recipe\) or choose {instead}"):
            export_gguf(path, root / "refused", [quant], name="tiny", pre_tokenizer="llama-bpe")
    spec = {"name": "Q4-s-q", "base": "Q4_K_M", "tensor_types": {"attn_q": "IQ2_S"}}
    with pytest.raises(ConfigError, match=r"Q4-s-q stores blk.0.attn_q.weight as IQ2_S, which needs an importance "
                                          r"matrix .* --imatrix FILE"):
        export_gguf(path, root / "refused", [spec], name="tiny", pre_tokenizer="llama-bpe")
    # IQ2_XXS / IQ2_XS cannot be made without weights at all: the token embeddings have no imatrix entry
    spec = {"name": "E", "base": "Q8_0", "embedding_type": "IQ2_XS"}
    with pytest.raises(ConfigError, match=r"E stores token_embd.weight as IQ2_XS, which llama.cpp cannot make "
                                          r"without importance weights .* choose another type for it"):
        export_gguf(path, root / "refused", [spec], name="tiny", imatrix=root / "imatrix.gguf",
                    pre_tokenizer="llama-bpe")
    assert not (root / "refused").exists() or not any((root / "refused").iterdir())
    for args in (["IQ2_XXS"], ["IQ2_M"], ["--tensor-type", "attn_q=iq2_s", "Q4_K_M"]):   # llama-quantize too
        rc, log = _llama_quantize(llama_tools, [*args[:-1], f32, root / "refused.gguf", args[-1], 2])
        assert rc != 0 and "requires an importance matrix" in log, log[-2000:]


# -- the kernels -------------------------------------------------------------------------------------------------------
def test_weights_required_and_round_trip():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((32, 512)).astype(np.float32)
    w = (rng.random(512) ** 4 * 10).astype(np.float32)
    for qtype, bound in ((QT.IQ2_XXS, 0.75), (QT.IQ2_XS, 0.6), (QT.IQ2_S, 0.45)):
        raw = quants.quantize(x, qtype, w)
        assert raw.shape == (32, 2 * quants.type_size(qtype))
        y = quants.dequantize(raw, qtype)
        rel = float(np.sqrt(np.mean(w * (x - y) ** 2)) / np.sqrt(np.mean(w * x ** 2)))   # what the weights protect
        assert rel < bound, (qtype.name, rel)
        with pytest.raises(quants.QuantizeError, match="multiple of 256"):
            quants.quantize(x[:, :96], qtype, w[:96])
        assert not quants.quantize(np.zeros((1, 256), np.float32), qtype, w[:256]).any()   # all zero: zero bytes
    for qtype in (QT.IQ2_XXS, QT.IQ2_XS):
        with pytest.raises(quants.QuantizeError, match=f"cannot quantize to {qtype.name} without importance weights"):
            quants.quantize(x, qtype)
    plain = quants.quantize(x, QT.IQ2_S)
    assert plain.tobytes() != quants.quantize(x, QT.IQ2_S, w).tobytes()
    y = quants.dequantize(plain, QT.IQ2_S)
    assert float(np.sqrt(np.mean((x - y) ** 2))) < 0.35


def test_grid_neighbours_follow_cs_rule():
    """iq2xs_init_impl's lists: for a level group off the grid, every grid point at one of the ``nwant`` smallest
    squared distances, sorted by distance then index (checked by brute force on a sample of keys, levels 0..2)."""
    iq2 = _iquants2()
    rng = np.random.default_rng(3)
    for grid, kmap, neighbours, nwant in ((iq2.GRID_XXS, iq2.KMAP_XXS, iq2.NEIGHBOURS_XXS, 2),
                                          (iq2.GRID_XS, iq2.KMAP_XS, iq2.NEIGHBOURS_XS, 2),
                                          (iq2.GRID_S, iq2.KMAP_S, iq2.NEIGHBOURS_S, 1)):
        levels = rng.integers(0, 3, (200, 8))
        for lv in levels:
            u = int((lv << (2 * np.arange(8))).sum())
            if kmap[u] >= 0:
                assert (grid[kmap[u]] == 2 * lv + 1).all()
                continue
            d2 = ((grid.astype(int) - (2 * lv + 1)) ** 2).sum(axis=1)
            cut = np.unique(d2)[:nwant].max()
            want = sorted((d, j) for j, d in enumerate(d2) if d <= cut)
            start = -kmap[u] - 1
            listed = neighbours[start + 1:start + 1 + neighbours[start]]
            assert [(d2[j], j) for j in listed] == want
        key3 = 3 << 14   # a level 3: no quantizer forms it
        assert kmap[key3] == iqgrid.UNREACHABLE


# -- dequantization: C's formula ---------------------------------------------------------------------------------------
IQ2_VALUES = np.array([8, 25, 43], np.float32)                       # iq2xxs_grid's bytes: 0x08, 0x19, 0x2b


def _grid_values(kgrid) -> np.ndarray:
    kgrid = np.asarray(kgrid)
    return IQ2_VALUES[(kgrid[:, None] >> (2 * np.arange(8))) & 3]     # [n, 8]


def _signs8(s7):
    parity = np.array([bin(int(v)).count("1") & 1 for v in np.ravel(s7)]).reshape(np.shape(s7))
    return s7 | (parity << 7)   # ksigns_iq2xs: 7 stored sign bits, the 8th makes their count even


def dequantize_c(raw: np.ndarray, qtype: QT) -> np.ndarray:
    """ggml's dequantize_row_iq2_xxs / _xs / _s, written out: [rows, bytes] -> float32 [rows, n]."""
    iq2 = _iquants2()
    rows = raw.shape[0]
    b = raw.reshape(-1, quants.type_size(qtype))
    d = b[:, :2].copy().view("<f2").astype(np.float32)[:, 0]
    out = np.empty((b.shape[0], 256), np.float32)
    quarter, half = np.float32(0.25), np.float32(0.5)

    def put(ib32, l, db, idx, s8, grid):
        sign = (s8[:, None] >> np.arange(8)[None, :]) & 1
        out[:, 32 * ib32 + 8 * l:32 * ib32 + 8 * l + 8] = (db[:, None] * grid[idx]) * np.where(sign, -1, 1)

    if qtype == QT.IQ2_XXS:
        grid = _grid_values(iq2.KGRID_256)
        q = b[:, 2:66].copy().view("<u4")
        for ib32 in range(8):
            aux0, aux1 = q[:, 2 * ib32], q[:, 2 * ib32 + 1]
            db = d * (half + (aux1 >> 28).astype(np.float32)) * quarter
            for l in range(4):
                put(ib32, l, db, (aux0 >> (8 * l)) & 255, _signs8(((aux1 >> (7 * l)) & 127).astype(np.int64)), grid)
    elif qtype == QT.IQ2_XS:
        grid = _grid_values(iq2.KGRID_512)
        q, scales = b[:, 2:66].copy().view("<u2"), b[:, 66:74]
        for ib32 in range(8):
            for l in range(4):
                db = d * (half + ((scales[:, ib32] >> (4 * (l // 2))) & 0xF).astype(np.float32)) * quarter
                v = q[:, 4 * ib32 + l].astype(np.int64)
                put(ib32, l, db, v & 511, _signs8(v >> 9), grid)
    else:
        grid = _grid_values(iq2.KGRID_1024)
        qs, signs, qh, scales = b[:, 2:34], b[:, 34:66], b[:, 66:74], b[:, 74:82]
        for ib32 in range(8):
            for l in range(4):
                db = d * (half + ((scales[:, ib32] >> (4 * (l // 2))) & 0xF).astype(np.float32)) * quarter
                idx = qs[:, 4 * ib32 + l].astype(np.int64) | ((qh[:, ib32].astype(np.int64) << (8 - 2 * l)) & 0x300)
                put(ib32, l, db, idx, signs[:, 4 * ib32 + l].astype(np.int64), grid)
    return out.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S], ids=lambda t: t.name)
def test_dequantize_is_c_formula(qtype):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((16, 512)).astype(np.float32)
    raw = quants.quantize(x, qtype, (rng.random(512) + 0.1).astype(np.float32))
    np.testing.assert_array_equal(quants.dequantize(raw, qtype), dequantize_c(raw, qtype))
    rand = rng.integers(0, 256, raw.shape, dtype=np.uint8)   # any bytes with finite scales
    rand.reshape(-1, quants.type_size(qtype))[:, 1] &= 0x3B
    np.testing.assert_array_equal(quants.dequantize(rand, qtype), dequantize_c(rand, qtype))


def test_grid_tables_are_gguf_pys():
    iq2 = _iquants2()
    for kgrid, ref in ((iq2.KGRID_256, gguf.quants.IQ2_XXS), (iq2.KGRID_512, gguf.quants.IQ2_XS),
                       (iq2.KGRID_1024, gguf.quants.IQ2_S)):
        ref.init_grid()
        np.testing.assert_array_equal(_grid_values(kgrid), ref.grid.reshape(-1, 8).astype(np.float32))


# -- the mixes ---------------------------------------------------------------------------------------------------------
def _descs(ffn=256):
    def desc(name, ne0=256):
        return TensorDesc(name, ne0, 2)

    tensors = [desc("token_embd.weight"), desc("output.weight")]
    for i in range(16):
        tensors += [desc(f"blk.{i}.attn_q.weight"), desc(f"blk.{i}.attn_k.weight"), desc(f"blk.{i}.attn_v.weight"),
                    desc(f"blk.{i}.attn_output.weight"), desc(f"blk.{i}.ffn_gate.weight"),
                    desc(f"blk.{i}.ffn_up.weight"), desc(f"blk.{i}.ffn_down.weight", ffn)]
    return tensors


@pytest.mark.parametrize("quant", ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M"])
def test_mix_rules(quant):
    """llama.cpp's very-low-bit branch of llama_tensor_get_type: output Q5_K, token embeddings Q2_K (IQ2_XXS/XS) or
    IQ3_S, attn_v Q4_K from n_gqa 4 or 4 experts (else IQ3_S / Q2_K), the first eighth of ffn_down IQ3_S / Q2_K,
    attn_output IQ3_S for IQ2_S/M (8 experts: Q5_K), 8 experts' attn_k Q4_K; the default type elsewhere (IQ2_S's is
    IQ2_XS, IQ2_M's IQ2_S); fallback IQ4_NL."""
    tensors = _descs(ffn=352)
    default = {"IQ2_XXS": QT.IQ2_XXS, "IQ2_XS": QT.IQ2_XS, "IQ2_S": QT.IQ2_XS, "IQ2_M": QT.IQ2_S}[quant]
    s_or_m = quant in ("IQ2_S", "IQ2_M")
    for gqa, n_expert in ((1, 0), (4, 0), (1, 4), (1, 8)):
        got = dict(zip([t.name for t in tensors], tensor_types(tensors, quant, ModelShape(16, 4 * gqa, 4,
                                                                                          n_expert=n_expert))))
        assert got["output.weight"] == QT.Q5_K
        assert got["token_embd.weight"] == (QT.IQ3_S if s_or_m else QT.Q2_K)
        v = QT.Q4_K if gqa >= 4 or n_expert >= 4 else QT.IQ3_S if s_or_m else QT.Q2_K
        assert got["blk.0.attn_v.weight"] == got["blk.9.attn_v.weight"] == v
        assert got["blk.2.attn_k.weight"] == (QT.Q4_K if n_expert == 8 else default)
        assert got["blk.2.attn_q.weight"] == got["blk.2.ffn_up.weight"] == got["blk.9.ffn_gate.weight"] == default
        assert got["blk.2.attn_output.weight"] == (QT.Q5_K if n_expert == 8 else QT.IQ3_S if s_or_m else default)
        for i in range(16):   # 352 wide: IQ3_S / IQ2 fall back to IQ4_NL, Q2_K to Q4_0
            first = QT.IQ4_NL if s_or_m else QT.Q4_0
            assert got[f"blk.{i}.ffn_down.weight"] == (first if i < 2 else QT.IQ4_NL), i
    assert tensor_types([TensorDesc("blk.0.ffn_up.weight", 48, 2)], quant, ModelShape(8, 4, 4)) == [QT.F16]


def test_iq3_xxs_mix_is_offered():
    got = dict(zip([t.name for t in _descs()], tensor_types(_descs(), "IQ3_XXS", ModelShape(16, 4, 4),
                                                           has_imatrix=True)))
    assert got["blk.0.attn_q.weight"] == got["blk.0.attn_k.weight"] == QT.IQ2_S
    assert got["output.weight"] == QT.Q5_K and got["blk.3.ffn_up.weight"] == QT.IQ3_XXS


def test_recipe_and_cli_name_the_imatrix_flag(tmp_path):
    from typer.testing import CliRunner

    from releaser.cli import app
    from releaser.gguf.options import GGUFOptions

    for quant in ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M"):
        with pytest.raises(ConfigError, match=f"{quant} needs an importance matrix .* give one, or use Q2_K"):
            GGUFOptions.build(quants=[quant])
    res = CliRunner().invoke(app, ["gguf", str(tmp_path), "-o", str(tmp_path / "out"), "--quant", "IQ2_M"])
    assert res.exit_code != 0 and "--imatrix: IQ2_M needs an importance matrix" in " ".join(res.output.split())
