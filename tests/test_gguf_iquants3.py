"""IQ3_S and IQ3_XXS (releaser.gguf.iquants3) and the IQ3_S / IQ3_M / IQ3_XS mixes against llama.cpp's own
``llama-quantize`` (tests/build_llama_tools.sh):

* whole files: a tiny 8-layer Llama with a 200-token BPE vocabulary (llama-quantize is slow on large vocabularies),
  n_gqa 4 (attn_v takes Q4_K) and 352-wide FFN rows (IQ3_S falls back to IQ4_NL, Q4_K to Q5_0), every matrix
  starting with edge rows (zeros, constant, one outlier, huge, tiny, ties, signed zeros: IQ3_S's all-zero block
  shifts the next blocks' bytes, as in C), exported by ``releaser gguf`` with and without an importance matrix,
  equal llama-quantize's files made from our F32 file, tensor for tensor (names, types, bytes);
* IQ3_XXS without weights (llama-quantize allows it for the token embeddings and the output only);
* the refusals: IQ3_XS, or any IQ3_XXS tensor, without an imatrix (llama-quantize refuses them too);
* dequantization: gguf-py's (what the quality stage and ``gguf-fix`` use) equals C's dequantize_row_iq3_s/xxs
  written out here; the grid tables equal gguf-py's; the mixes' rules.
"""

from __future__ import annotations

import subprocess

import gguf
import numpy as np
import pytest

from releaser.errors import ConfigError
from releaser.gguf import export_gguf, iquants3, quants
from releaser.gguf.mixes import ModelShape, TensorDesc, _Mix, tensor_types
from releaser_testing import tiny_chat_model

from test_gguf_imatrix import synthetic_entries, write_imatrix
from test_gguf_quants import with_edge_rows

QT = gguf.GGMLQuantizationType
MIXES = ["IQ3_S", "IQ3_M"]            # and IQ3_XS, which needs an imatrix


def _oracle():
    import gguf_oracle

    return gguf_oracle


# -- whole files: releaser gguf against llama-quantize -----------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny Llama with edge rows in every matrix, our F32 file of it and a synthetic imatrix for it."""
    from safetensors.numpy import load_file, save_file

    root = tmp_path_factory.mktemp("iquants3")
    path = tiny_chat_model(root / "llama", "llama", layers=8, hidden=256, intermediate=352, heads=4, kv_heads=1)
    weights = path / "model.safetensors"
    tensors = load_file(weights)
    save_file({k: with_edge_rows(v.copy()) if v.ndim == 2 and v.shape[1] >= 256 else v for k, v in tensors.items()},
              weights, metadata={"format": "pt"})
    f32 = export_gguf(path, root / "f32", ["F32"], name="tiny", pre_tokenizer="llama-bpe").files["F32"][0]
    shapes = {t.name: tuple(int(n) for n in t.data.shape) for t in gguf.GGUFReader(f32).tensors
              if t.data.ndim == 2 and t.name != "token_embd.weight"}
    write_imatrix(root / "imatrix.gguf", synthetic_entries(shapes))
    return root, path, f32


def _llama_quantize(llama_tools, args, timeout=600):
    proc = subprocess.run([str(llama_tools / "llama-quantize"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
def test_files_equal_llama_quantize(model, llama_tools, with_imatrix):
    o = _oracle()
    root, path, f32 = model
    imatrix = root / "imatrix.gguf" if with_imatrix else None
    mixes = MIXES + (["IQ3_XS"] if with_imatrix else [])
    result = export_gguf(path, root / f"ours-{with_imatrix}", mixes, name="tiny", imatrix=imatrix,
                         pre_tokenizer="llama-bpe")
    for quant in mixes:
        ref = root / f"ref-{quant}-{with_imatrix}.gguf"
        rc, log = _llama_quantize(llama_tools, [*(["--imatrix", imatrix] if imatrix else []), f32, ref, quant, 2])
        assert rc == 0, log[-3000:]
        mine, theirs = o.tensors(result.files[quant][0]), o.tensors(ref)
        assert {k: v[0] for k, v in mine.items()} == {k: v[0] for k, v in theirs.items()}   # names and types
        assert [k for k in mine if mine[k][1] != theirs[k][1]] == []                          # bytes
        assert o.keys(result.files[quant][0], "general.file_type") == o.keys(ref, "general.file_type")
        assert o.keys(result.files[quant][0], "quantize.") == o.keys(ref, "quantize.")
        types = result.tensor_types[quant]
        assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "IQ3_S"
        assert types["blk.0.attn_v.weight"] == "Q4_K"                                  # n_gqa 4
        assert types["blk.3.ffn_down.weight"] == "IQ4_NL"                               # 352 wide
        assert types["blk.0.ffn_down.weight"] == ("Q5_0" if quant == "IQ3_M" else "IQ4_NL")   # Q4_K at 352
        assert types["blk.0.attn_output.weight"] == ("Q4_K" if quant == "IQ3_M" else "IQ3_S")
        assert types["blk.3.ffn_up.weight"] == types["blk.3.attn_q.weight"] == (
            "IQ3_XXS" if quant == "IQ3_XS" else "IQ3_S")
        assert types["blk.0.ffn_up.weight"] == types["blk.7.ffn_gate.weight"] == "IQ3_S"   # IQ3_XS: outer layers
    if not with_imatrix:   # the card's rows and its pick guide name the IQ3 files
        from pathlib import Path

        from releaser.card import render_card

        # the checkout's template (an editable install may map releaser.templates to another checkout)
        card = render_card(root / "ours-False", template=Path(__file__).parents[1] / "templates" / "cards" /
                           "gguf.md.j2")
        assert "| tiny-IQ3_M.gguf | IQ3_M |" in card and "| tiny-IQ3_S.gguf | IQ3_S |" in card, card
        assert "IQ3_M, IQ3_S are 3-bit I-quants: each group of 4 weights is an index into a fixed grid" in card, card


@pytest.mark.slow
def test_iq3_xxs_without_weights_equals_llama_quantize(model, llama_tools):
    """llama-quantize writes IQ3_XXS without an imatrix for the token embeddings and the output only."""
    embeddings_and_output_equal_llama_quantize(model, llama_tools, QT.IQ3_XXS)


def embeddings_and_output_equal_llama_quantize(model, llama_tools, qtype: QT) -> None:
    """``qtype`` for the token embeddings and the output of a pure Q8_0 file, without an imatrix: our file is
    llama-quantize's."""
    o = _oracle()
    root, path, f32 = model
    ref = root / f"ref-{qtype.name}.gguf"
    rc, log = _llama_quantize(llama_tools, ["--pure", "--token-embedding-type", qtype.name.lower(),
                                            "--output-tensor-type", qtype.name.lower(), f32, ref, "Q8_0", 2])
    assert rc == 0, log[-3000:]
    spec = {"name": "EO", "base": "Q8_0", "pure": True, "embedding_type": qtype.name, "output_type": qtype.name}
    result = export_gguf(path, root / f"ours-{qtype.name}", [spec], name="tiny", pre_tokenizer="llama-bpe")
    mine, theirs = o.tensors(result.files["EO"][0]), o.tensors(ref)
    assert mine["token_embd.weight"][0] == mine["output.weight"][0] == qtype
    assert [k for k in mine if mine[k] != theirs[k]] == []


@pytest.mark.slow
def test_imatrix_types_are_refused_without_one(model, llama_tools):
    root, path, f32 = model
    with pytest.raises(ConfigError, match=r"IQ3_XS needs an importance matrix .* --imatrix FILE \(gguf.imatrix in a "
                                          r"recipe\) or choose IQ3_S"):
        export_gguf(path, root / "refused", ["IQ3_XS"], name="tiny", pre_tokenizer="llama-bpe")
    spec = {"name": "IQ3_S-xxs-q", "base": "IQ3_S", "tensor_types": {"attn_q": "IQ3_XXS"}}
    with pytest.raises(ConfigError, match=r"IQ3_S-xxs-q stores blk.0.attn_q.weight as IQ3_XXS, which needs an "
                                          r"importance matrix .* --imatrix FILE"):
        export_gguf(path, root / "refused", [spec], name="tiny", pre_tokenizer="llama-bpe")
    assert not (root / "refused").exists() or not any((root / "refused").iterdir())
    for args in (["IQ3_XS"], ["--tensor-type", "attn_q=iq3_xxs", "IQ3_S"]):   # llama-quantize refuses them too
        rc, log = _llama_quantize(llama_tools, [*args[:-1], f32, root / "refused.gguf", args[-1], 2])
        assert rc != 0 and "requires an importance matrix" in log, log[-2000:]


# -- dequantization: C's formula ---------------------------------------------------------------------------------------
IQ3S_VALUES = np.arange(1, 16, 2, dtype=np.float32)                                  # iq3s_grid's bytes: 2l + 1
IQ3XXS_VALUES = np.array([4, 12, 20, 28, 36, 44, 52, 62], np.float32)                # iq3xxs_grid's bytes


def _grid_values(kgrid, values) -> np.ndarray:
    kgrid = np.asarray(kgrid)
    return values[(kgrid[:, None] >> (3 * np.arange(4))) & 7]                        # [n, 4]


def dequantize_c(raw: np.ndarray, qtype: QT) -> np.ndarray:
    """ggml's dequantize_row_iq3_s / dequantize_row_iq3_xxs, written out: [rows, bytes] -> float32 [rows, n]."""
    rows = raw.shape[0]
    b = raw.reshape(-1, quants.type_size(qtype))
    d = b[:, :2].copy().view("<f2").astype(np.float32)[:, 0]
    out = np.empty((b.shape[0], 256), np.float32)
    if qtype == QT.IQ3_S:
        grid = _grid_values(iquants3.KGRID_512, IQ3S_VALUES)
        qs, qh, signs, scales = b[:, 2:66], b[:, 66:74], b[:, 74:106], b[:, 106:110]
        for ib in range(8):
            db = d * (1 + 2 * ((scales[:, ib // 2] >> (4 * (ib % 2))) & 0xF)).astype(np.float32)
            for k in range(8):   # grid point k of the block: qs[8 ib + k] with bit k of qh[ib] as its 9th bit
                idx = qs[:, 8 * ib + k].astype(np.int32) | (((qh[:, ib] >> k) & 1).astype(np.int32) << 8)
                sign = (signs[:, 4 * ib + k // 2] >> (4 * (k % 2) + np.arange(4)[:, None])).T & 1
                out[:, 32 * ib + 4 * k:32 * ib + 4 * k + 4] = (db[:, None] * grid[idx]) * np.where(sign, -1, 1)
        return out.reshape(rows, -1)
    assert qtype == QT.IQ3_XXS
    grid = _grid_values(iquants3.KGRID_256, IQ3XXS_VALUES)
    qs, sas = b[:, 2:66], b[:, 66:98].copy().view("<u4")
    for ib in range(8):
        aux = sas[:, ib]
        db = d * (np.float32(0.5) + (aux >> 28).astype(np.float32)) * np.float32(0.5)
        for l in range(4):   # ksigns_iq2xs: 7 stored sign bits, the 8th makes their count even
            s7 = ((aux >> (7 * l)) & 127).astype(np.int32)
            parity = np.array([bin(v).count("1") & 1 for v in s7])
            s8 = s7 | (parity << 7)
            for h in range(2):
                idx = qs[:, 8 * ib + 2 * l + h]
                sign = (s8[:, None] >> (4 * h + np.arange(4)[None, :])) & 1
                out[:, 32 * ib + 8 * l + 4 * h:32 * ib + 8 * l + 4 * h + 4] = (db[:, None] * grid[idx]) * \
                    np.where(sign, -1, 1)
    return out.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [QT.IQ3_S, QT.IQ3_XXS], ids=lambda t: t.name)
def test_dequantize_is_c_formula(qtype):
    rng = np.random.default_rng(8)
    x = with_edge_rows(rng.standard_normal((16, 512)).astype(np.float32))
    raw = quants.quantize(x, qtype)
    assert raw.dtype == np.uint8 and raw.shape == (16, 2 * quants.type_size(qtype))
    np.testing.assert_array_equal(quants.dequantize(raw, qtype), dequantize_c(raw, qtype))
    rand = rng.integers(0, 256, raw.shape, dtype=np.uint8)   # any bytes with finite scales
    rand.reshape(-1, quants.type_size(qtype))[:, 1] &= 0x3B
    np.testing.assert_array_equal(quants.dequantize(rand, qtype), dequantize_c(rand, qtype))


def test_grid_tables():
    """Our grids are gguf-py's (its hex tables, through llama.cpp's byte values), and every level group off the grid
    lists its nearest grid points, nearest first."""
    for kgrid, values, ref in ((iquants3.KGRID_512, IQ3S_VALUES, gguf.quants.IQ3_S),
                               (iquants3.KGRID_256, IQ3XXS_VALUES, gguf.quants.IQ3_XXS)):
        ref.init_grid()
        np.testing.assert_array_equal(_grid_values(kgrid, values), ref.grid.reshape(-1, 4).astype(np.float32))
    grid, kmap, neighbours = iquants3.GRID_S, iquants3.KMAP_S, iquants3.NEIGHBOURS_S
    assert (kmap >= 0).sum() == 512 and len(neighbours) == 28317
    for u in np.flatnonzero(kmap < 0)[[0, 7, 100, -1]]:   # off the grid: the listed points are the nearest, sorted by distance then index
        pos = 2 * ((u >> (3 * np.arange(4))) & 7) + 1
        start = -kmap[u] - 1
        listed = neighbours[start + 1:start + 1 + neighbours[start]]
        d2 = ((grid.astype(int) - pos) ** 2).sum(axis=1)
        assert list(zip(d2[listed], listed)) == sorted(zip(d2[listed], listed))
        assert d2[listed[0]] == d2.min() and len(set(d2[listed])) == 3


def test_round_trip_and_weights():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((32, 512)).astype(np.float32)
    w = (rng.random(512) ** 4 * 10).astype(np.float32)
    for qtype, bound in ((QT.IQ3_S, 0.2), (QT.IQ3_XXS, 0.25)):
        y = quants.dequantize(quants.quantize(x, qtype), qtype)
        rel = float(np.sqrt(np.mean((x - y) ** 2)) / np.sqrt(np.mean(x ** 2)))
        assert rel < bound, (qtype.name, rel)
        assert quants.quantize(x, qtype, w).tobytes() != quants.quantize(x, qtype).tobytes()
        with pytest.raises(quants.QuantizeError, match="multiple of 256"):
            quants.quantize(x[:, :96], qtype)
    # an all-zero super-block: IQ3_S and IQ3_XXS store zeros only (d = +0.0)
    for qtype in (QT.IQ3_S, QT.IQ3_XXS):
        assert not quants.quantize(np.zeros((1, 256), np.float32), qtype).any()


def test_all_zero_block_shifts_the_next_blocks_as_c_does():
    """quantize_row_iq3_s_impl skips an all-zero 32-weight block without moving its qs/signs pointers: block 1's grid
    indices and signs land in block 0's place, block 7's place stays zero (llama-quantize's bytes show it in the
    whole-file test's edge rows too)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    z = x.copy()
    z[0, :32] = 0.0
    a, b = quants.quantize(x, QT.IQ3_S)[0], quants.quantize(z, QT.IQ3_S)[0]
    qs_a, qs_b = a[2:66].reshape(8, 8), b[2:66].reshape(8, 8)
    signs_a, signs_b = a[74:106].reshape(8, 4), b[74:106].reshape(8, 4)
    np.testing.assert_array_equal(qs_b[:7], qs_a[1:])   # same blocks 1..7 (the scale of the super-block may differ,
    np.testing.assert_array_equal(signs_b[:7], signs_a[1:])   # but not each block's own search)
    assert not qs_b[7].any() and not signs_b[7].any()


# -- the mixes ---------------------------------------------------------------------------------------------------------
def _descs(ffn=256):
    def desc(name, ne0=256):
        return TensorDesc(name, ne0, 2)

    tensors = [desc("token_embd.weight"), desc("output.weight")]
    for i in range(8):
        tensors += [desc(f"blk.{i}.attn_q.weight"), desc(f"blk.{i}.attn_k.weight"), desc(f"blk.{i}.attn_v.weight"),
                    desc(f"blk.{i}.attn_output.weight"), desc(f"blk.{i}.ffn_gate.weight"),
                    desc(f"blk.{i}.ffn_up.weight"), desc(f"blk.{i}.ffn_down.weight", ffn)]
    return tensors


@pytest.mark.parametrize("quant", ["IQ3_S", "IQ3_M", "IQ3_XS"])
def test_mix_rules(quant):
    """llama.cpp's llama_tensor_get_type for the IQ3 mixes: output Q6_K, attn_v Q4_K (IQ3_S/IQ3_XS from n_gqa 4, IQ3_M
    always), IQ3_M's attn_output Q4_K and first eighth of ffn_down Q4_K, IQ3_XS's attn_q/attn_k and middle ffn_gate/
    ffn_up IQ3_XXS, 8-expert models' attn_output Q5_K and attn_v Q8_0, and the fallbacks IQ3 -> IQ4_NL, F16."""
    tensors = _descs(ffn=352)
    for gqa, n_expert in ((1, 0), (4, 0), (1, 8)):
        got = dict(zip([t.name for t in tensors], tensor_types(tensors, quant, ModelShape(8, 4 * gqa, 4,
                                                                                          n_expert=n_expert))))
        xs = quant == "IQ3_XS"
        assert got["output.weight"] == QT.Q6_K and got["token_embd.weight"] == QT.IQ3_S
        v = QT.Q8_0 if n_expert == 8 else QT.Q4_K if gqa >= 4 or quant == "IQ3_M" else QT.IQ3_S
        assert got["blk.0.attn_v.weight"] == v
        assert got["blk.0.attn_output.weight"] == (QT.Q5_K if n_expert == 8 else QT.Q4_K if quant == "IQ3_M"
                                                   else QT.IQ3_S)
        assert got["blk.2.attn_q.weight"] == (QT.IQ3_XXS if xs else QT.IQ3_S)
        assert got["blk.2.attn_k.weight"] == (QT.Q8_0 if n_expert == 8 else QT.IQ3_XXS if xs else QT.IQ3_S)
        for i in range(8):
            middle = xs and 1 <= i < 7
            assert got[f"blk.{i}.ffn_up.weight"] == got[f"blk.{i}.ffn_gate.weight"] == (
                QT.IQ3_XXS if middle else QT.IQ3_S)
            m_down = quant == "IQ3_M" and (i == 0 or (n_expert == 8 and i in (3, 6, 7)))   # use_more_bits
            assert got[f"blk.{i}.ffn_down.weight"] == (QT.Q5_0 if m_down else QT.IQ4_NL), i   # 352 wide
    assert tensor_types([TensorDesc("blk.0.ffn_up.weight", 48, 2)], quant, ModelShape(8, 4, 4)) == [QT.F16]


def test_iq3_xxs_mix_rules_are_llama_cpps():
    """The IQ3_XXS mix's rules are llama.cpp's (its attn_q/attn_k take IQ2_S; whole files: test_gguf_iquants2)."""
    shape = ModelShape(8, 4, 4)
    for has_imatrix, v in ((True, QT.IQ3_XXS), (False, QT.IQ3_S)):
        tensors = _descs()
        mix = _Mix("IQ3_XXS", tensors, shape, has_imatrix)
        got = {t.name: mix.pick(t, QT.IQ3_XXS) for t in tensors}
        assert got["output.weight"] == QT.Q5_K and got["token_embd.weight"] == QT.IQ3_S
        assert got["blk.0.attn_v.weight"] == v and got["blk.0.attn_output.weight"] == QT.IQ3_S
        assert got["blk.0.attn_q.weight"] == got["blk.0.attn_k.weight"] == QT.IQ2_S
        assert got["blk.0.ffn_down.weight"] == (QT.IQ3_XXS if has_imatrix else QT.Q4_K)
        assert got["blk.1.ffn_down.weight"] == (QT.IQ3_XXS if has_imatrix else QT.Q3_K)


def test_recipe_and_cli_name_the_imatrix_flag(tmp_path):
    from typer.testing import CliRunner

    from releaser.cli import app
    from releaser.gguf.options import GGUFOptions

    with pytest.raises(ConfigError, match="IQ3_XS needs an importance matrix .* give one, or use IQ3_S"):
        GGUFOptions.build(quants=["IQ3_XS"])
    GGUFOptions.build(quants=["IQ3_S", "IQ3_M"])   # these need none
    res = CliRunner().invoke(app, ["gguf", str(tmp_path), "-o", str(tmp_path / "out"), "--quant", "IQ3_XS"])
    assert res.exit_code != 0 and "--imatrix: IQ3_XS needs an importance matrix" in " ".join(res.output.split())
