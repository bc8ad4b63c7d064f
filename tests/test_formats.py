"""One quantization, more serializations: compressed-tensors W4A16 from the AWQ codes, MLX affine from the unquantized
weights. Each is read by the loader its users run (compressed-tensors + transformers, mlx + mlx-lm), whose weights
and logits must equal ours; and the release writes, measures, cards and gates them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import require
from releaser_testing import FAMILY_CONFIGS, rtn_awq, tiny_family_model, tiny_tokenizer

MLX_FAMILIES = [f for f in FAMILY_CONFIGS if f != "qwen3moe"]
IDS = [[1, 17, 42, 99, 7, 3, 250, 12, 64, 5, 33, 8, 120, 77, 2, 19]]


def _model(root: Path, family: str, dtype: str = "float32", **kw) -> Path:
    m = tiny_family_model(root / f"{family}-{dtype}", family, vocab=256, dtype=dtype, **kw)
    tiny_tokenizer(m, vocab=256)
    return m


@pytest.fixture(scope="module")
def w4a16(tmp_path_factory):
    """A tiny Qwen3 (GQA, QK-norm), its round-to-nearest AWQ folder (group 32) and the W4A16 folder made from it."""
    from releaser.formats.w4a16 import convert

    root = tmp_path_factory.mktemp("w4a16")
    model = _model(root, "qwen3")
    awq = rtn_awq(model, root / "tiny-AWQ", group_size=32)
    out = root / "tiny-W4A16"
    result = convert(awq, out)
    return model, awq, out, result


def test_pack_rows_is_compressed_tensors_packing():
    ct = require("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from releaser.awq.pack import pack_rows, unpack_rows

    codes = torch.randint(0, 16, (24, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    assert ct.__version__.startswith("0.20")
    ours = pack_rows(codes)
    assert torch.equal(ours, pack_to_int32((codes - 8).to(torch.int8), 4))
    assert torch.equal(pack_rows(codes.t().contiguous()).t(), pack_to_int32((codes - 8).to(torch.int8), 4, 0))
    assert torch.equal(unpack_rows(ours), codes.to(torch.uint8))
    assert torch.equal(unpack_rows(pack_rows(codes, 8, unsigned=True), 8), codes.to(torch.uint8))


def test_w4a16_config_is_compressed_tensors_0_20s(w4a16):
    require("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig

    _, _, out, result = w4a16
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    weights = parsed.config_groups["group_0"].weights
    assert (parsed.format, parsed.quant_method, weights.num_bits, weights.group_size, weights.symmetric,
            weights.strategy) == ("pack-quantized", "compressed-tensors", 4, 32, False, "group")
    assert qc["ignore"] == ["lm_head"] and result.facts["linears"] == 14
    from safetensors.torch import load_file

    t = load_file(out / "model.safetensors")
    base = "model.layers.0.self_attn.q_proj"
    assert t[base + ".weight_packed"].dtype == torch.int32 and t[base + ".weight_packed"].shape == (128, 8)
    assert t[base + ".weight_scale"].shape == (128, 2) and t[base + ".weight_zero_point"].shape == (16, 2)
    assert t[base + ".weight_shape"].tolist() == [128, 64]
    assert not [n for n in t if n.endswith((".qweight", ".qzeros", ".scales"))]


def test_compressed_tensors_decompresses_our_weights_to_the_awq_weights(w4a16):
    require("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    from releaser.quality.load import AWQWeights, W4A16Weights

    _, awq, out, _ = w4a16
    scheme = QuantizationConfig.model_validate(
        json.loads((out / "config.json").read_text())["quantization_config"]).config_groups["group_0"]
    t = load_file(out / "model.safetensors")
    ref = AWQWeights(awq)
    ours = W4A16Weights(out)
    assert sorted(ours.names) == sorted(ref.names) and ours.shapes() == ref.shapes()
    linears = [n for n in ref.names if n.endswith("proj.weight")]
    mine = dict(ours.load(linears))
    for name, w in ref.load(linears):
        base = name.removesuffix(".weight")
        local = {k.removeprefix(base + "."): v for k, v in t.items() if k.startswith(base + ".weight_")}
        theirs = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        assert theirs.dtype == torch.float16 and torch.equal(theirs, w.half()), name   # float16 scales: exact
        assert torch.equal(mine[name], w), name


def test_transformers_loads_the_w4a16_folder_and_its_logits_are_ours(w4a16):
    """transformers + compressed-tensors on CPU (dequantize=True: its compressed path cannot hold asymmetric packed
    zero points, llm-compressor#1618): every linear is the AWQ weight as compressed-tensors computes it (in the
    float16 of the scales), and the logits follow our float32 dequantized model's."""
    require("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from releaser.quality.load import AWQWeights, Artefact, load

    _, awq, out, _ = w4a16
    model = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True),
                                                 dtype=torch.float32).eval()
    state = model.state_dict()
    for name, w in AWQWeights(awq).load([n for n in AWQWeights(awq).names if n.endswith("proj.weight")]):
        assert torch.equal(state[name], w.half().float()), name
    ours = load(Artefact(out, "w4a16", "W4A16", out.name))
    ids = torch.tensor(IDS)
    with torch.no_grad():
        theirs, mine = model(ids).logits, ours(ids).logits
    torch.testing.assert_close(theirs, mine, rtol=0, atol=2e-3)
    assert torch.equal(theirs.argmax(-1), mine.argmax(-1))


def test_w4a16_of_an_moe_ignores_the_routers(tmp_path):
    from releaser.formats.w4a16 import convert
    from releaser.quality.load import AWQWeights, W4A16Weights

    model = _model(tmp_path, "qwen3moe")
    awq = rtn_awq(model, tmp_path / "moe-AWQ", group_size=32)
    out = tmp_path / "moe-W4A16"
    convert(awq, out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    ref, ours = AWQWeights(awq), W4A16Weights(out)
    names = [n for n in ref.names if ".experts." in n][:6]
    assert names and all(torch.equal(a[1], b[1]) for a, b in zip(ref.load(names), ours.load(names)))


# ------------------------------------------------------------------------------------------------------------ MLX


@pytest.fixture(scope="module")
def mlx_folders(tmp_path_factory):
    """family -> (bfloat16 model, our MLX folder, mlx_lm.convert's folder of the same model)."""
    require("mlx_lm")
    from mlx_lm.convert import convert as mlx_convert

    from releaser.formats.mlx import quantize_folder
    from releaser.formats.options import MLXOptions

    root = tmp_path_factory.mktemp("mlx")
    out = {}
    for fam in MLX_FAMILIES:
        model = _model(root, fam, "bfloat16")
        ours = root / f"{fam}-MLX-4bit"
        quantize_folder(MLXOptions(embedding_bits=4), model, ours)   # mlx_lm.convert -q's recipe
        ref = root / f"{fam}-mlx-lm"
        mlx_convert(str(model), mlx_path=str(ref), quantize=True, q_group_size=64, q_bits=4)
        out[fam] = (model, ours, ref)
    return out


@pytest.mark.parametrize("family", MLX_FAMILIES)
def test_mlx_folder_is_mlx_lm_converts(mlx_folders, family):
    """Every tensor equals what mlx_lm.convert -q writes for the model (same names, dtypes, codes, scales, biases),
    and config.json's quantization is its."""
    mx = require("mlx.core")
    _, ours, ref = mlx_folders[family]
    a = mx.load(str(ours / "model.safetensors"))
    b = {}
    for f in ref.glob("*.safetensors"):
        b.update(mx.load(str(f)))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert mx.array_equal(a[name], b[name]).item(), name
    assert json.loads((ours / "config.json").read_text())["quantization"] == \
        json.loads((ref / "config.json").read_text())["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "phi3"])   # mlx-lm's gemma3 needs 6+ layers
def test_mlx_lm_loads_our_folder_and_its_weights_and_logits_are_ours(mlx_folders, family):
    mx = require("mlx.core")
    from mlx.utils import tree_flatten
    from mlx_lm import load as mlx_load

    from releaser.formats.mlx import dequantize_mlx
    from releaser.quality.load import Artefact, MLXWeights, load

    _, ours, _ = mlx_folders[family]
    model, _ = mlx_load(str(ours))
    params = dict(tree_flatten(model.parameters()))
    weights = MLXWeights(ours)
    checked = 0
    for name in weights.names:
        if name.removesuffix(".weight") + ".scales" not in params:
            continue
        base = name.removesuffix(".weight")
        theirs = mx.dequantize(params[name], params[base + ".scales"], params[base + ".biases"], group_size=64,
                               bits=4)
        mine = dequantize_mlx(*(weights.reader.read(base + part) for part in (".weight", ".scales", ".biases")), 4, 64,
                              exact=False)
        t = lambda a: torch.from_numpy(np.array(a.astype(mx.float32)))   # noqa: E731
        assert torch.equal(t(theirs), mine.float()), name
        checked += 1
    assert checked >= 8
    # the same weights in float32 (bfloat16 scales and norms upcast exactly): mlx-lm's forward against ours; within
    # Gemma 2's sliding window (8 here), which mlx-lm's gemma2 does not apply
    ids = [IDS[0][:8]] if family == "gemma2" else IDS
    model.set_dtype(mx.float32)
    ours_model = load(Artefact(ours, "mlx", "MLX-4bit", ours.name))
    with torch.no_grad():
        mine = ours_model(torch.tensor(ids)).logits[0]
    theirs = torch.from_numpy(np.array(model(mx.array(ids))))[0]
    torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-4)


def test_mlx_of_an_moe_stacks_the_experts_and_keeps_the_router(tmp_path):
    """Qwen3-MoE: experts stacked as mlx-lm's switch_mlp, router unquantized; mlx-lm loads it (config.json given the
    keys released Qwen3-MoE configs have) and its logits follow ours."""
    mx = require("mlx.core")
    from mlx_lm import load as mlx_load

    from releaser.formats.mlx import quantize_folder
    from releaser.formats.options import MLXOptions
    from releaser.quality.load import Artefact, load

    model = _model(tmp_path, "qwen3moe", "float32")
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(num_experts=4, rope_theta=cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    (model / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "moe-MLX-4bit"
    quantize_folder(MLXOptions(), model, out)
    t = mx.load(str(out / "model.safetensors"))
    assert t["model.layers.0.mlp.switch_mlp.gate_proj.weight"].shape == (4, 64, 8)
    assert t["model.layers.0.mlp.gate.weight"].dtype == mx.float32 and "model.layers.0.mlp.gate.scales" not in t
    mlx_model, _ = mlx_load(str(out))
    mlx_model.set_dtype(mx.float32)
    ours = load(Artefact(out, "mlx", "MLX-4bit", out.name))
    ids = torch.tensor(IDS)
    with torch.no_grad():
        mine = ours(ids).logits[0]
    theirs = torch.from_numpy(np.array(mlx_model(mx.array(IDS))))[0]
    torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-4)


def test_mlx_refuses_a_w4a16_input_and_8_bits_of_an_awq_folder(w4a16, tmp_path):
    from releaser.errors import ReleaserError
    from releaser.formats.mlx import quantize_folder
    from releaser.formats.options import MLXOptions

    for folder, options in ((w4a16[2], MLXOptions()), (w4a16[1], MLXOptions(bits=8))):
        with pytest.raises(ReleaserError) as exc:
            quantize_folder(options, folder, tmp_path / "x")
        assert "\n" not in str(exc.value) and not (tmp_path / "x").exists()
    assert "bits 4" in str(exc.value)


@pytest.mark.parametrize("family", ["qwen3", "qwen3moe"])
def test_mlx_of_an_awq_folder_is_the_awq_weights_as_mlx_lm_reads_them(tmp_path, family):
    """MLX from the AWQ pass (source awq): every linear's weight, scales and biases equal what mlx-lm's own AutoAWQ
    loader makes of the AWQ folder, the norms are the AWQ folder's (they carry its scales), the embedding is rounded
    to 8 bits (config.json's per-layer entry says so, mlx-lm follows it), and mlx-lm's logits equal our dequantized
    model's."""
    mx = require("mlx.core")
    from mlx.utils import tree_flatten
    from mlx_lm import load as mlx_load

    from releaser.awq.pack import dequantize
    from releaser.formats.mlx import dequantize_mlx, quantize_folder
    from releaser.formats.options import MLXOptions
    from releaser.quality.load import Artefact, load

    model = _model(tmp_path, family, "float32")
    if family == "qwen3moe":
        cfg = json.loads((model / "config.json").read_text())
        cfg.update(num_experts=4, rope_theta=cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
        (model / "config.json").write_text(json.dumps(cfg))
    awq = rtn_awq(model, tmp_path / "tiny-AWQ", group_size=32)
    out = tmp_path / "tiny-MLX-4bit"
    result = quantize_folder(MLXOptions(), awq, out)
    assert result.facts["source"] == "awq" and result.facts["embedding_bits"] == 8
    q = json.loads((out / "config.json").read_text())["quantization"]
    ours = mx.load(str(out / "model.safetensors"))
    awq_t = mx.load(str(awq / "model.safetensors"))
    eight = {"group_size": 64, "bits": 8, "mode": "affine"}
    assert "lm_head.weight" in awq_t and ours["lm_head.weight"].dtype == mx.uint32   # untied: the head is 8-bit too
    assert q == {"group_size": 32, "bits": 4, "mode": "affine", "model.embed_tokens": eight, "lm_head": eight}
    t = lambda a: torch.from_numpy(np.array(a.astype(mx.float32)))   # noqa: E731
    linears = [n.removesuffix(".scales") for n in ours if n.endswith(".scales") and ".layers." in n]
    assert len(linears) >= 14
    for base in linears:   # each linear (each expert of a stacked switch_mlp) is the AWQ folder's, repacked
        experts = ours[base + ".scales"].ndim == 3
        for e in range(4 if experts else 1):
            src = base.replace(".switch_mlp.", f".experts.{e}.") if experts else base
            w = dequantize(*(torch.from_numpy(np.array(awq_t[src + p])) for p in (".qweight", ".qzeros", ".scales")),
                           32)
            mine = dequantize_mlx(*(torch.from_numpy(np.array(ours[base + p][e] if experts else ours[base + p]))
                                    for p in (".weight", ".scales", ".biases")), 4, 32)
            torch.testing.assert_close(mine, w, rtol=0, atol=1e-3)
    if family == "qwen3":   # mlx-lm's own AutoAWQ reader makes the same tensors of the AWQ folder
        theirs_model, _ = mlx_load(str(awq))
        theirs = dict(tree_flatten(theirs_model.parameters()))
        for base in linears:
            for part in (".weight", ".scales", ".biases"):
                assert ours[base + part].dtype == theirs[base + part].dtype, base + part
                assert mx.array_equal(ours[base + part], theirs[base + part]).item(), base + part
    for name, a in ours.items():
        if "norm" in name:
            assert mx.array_equal(a, awq_t[name]).item(), name
    emb = dequantize_mlx(*(torch.from_numpy(np.array(ours["model.embed_tokens" + p])) for p in
                           (".weight", ".scales", ".biases")), 8, 64)
    torch.testing.assert_close(emb, t(awq_t["model.embed_tokens.weight"]), rtol=0, atol=4e-3)
    mlx_model, _ = mlx_load(str(out))
    params = dict(tree_flatten(mlx_model.parameters()))
    assert params["model.embed_tokens.weight"].shape == (256, 64 * 8 // 32)
    mlx_model.set_dtype(mx.float32)
    mine_model = load(Artefact(out, "mlx", "MLX-4bit", out.name))
    with torch.no_grad():
        mine = mine_model(torch.tensor(IDS)).logits[0]
    torch.testing.assert_close(t(mlx_model(mx.array(IDS)))[0], mine, rtol=0, atol=1e-4)


# -------------------------------------------------------------------------------------------------------- release


def test_release_writes_measures_cards_and_publishes_every_format(tmp_path):
    """A recipe with awq.formats [autoawq, compressed-tensors] and mlx: the -AWQ, -W4A16 and -MLX-4bit folders, each
    measured (W4A16's figures are AWQ's: the same weights), carded, gated and published; the main card's table lists
    every version with its figures; a second run does nothing."""
    from releaser.pipeline.run import run_release

    model = _model(tmp_path, "qwen3")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""name: alice/Tiny-Formats
description: Tiny model released in every format.
stop_audit: false
license: mit
model: {model}
awq: {{samples: 8, seqlen: 64, formats: [autoawq, compressed-tensors]}}
mlx: {{group_size: 32}}
quality: {{ctx: 64, chunks: 2, stop_test: false}}
""")
    work = tmp_path / "work"
    result = run_release(recipe, work)
    ran = [s.name for s in result.stages if s.status == "ran"] if hasattr(result, "stages") else None
    m = json.loads((work / "release.json").read_text())
    assert {"awq", "w4a16", "mlx", "quality", "cards", "publish"} <= set(m["stages"]), (ran, sorted(m["stages"]))
    report = json.loads((work / "quality.json").read_text())
    rows = {r["file"]: r for r in report["artefacts"]}
    assert sorted(rows) == ["Tiny-Formats-AWQ", "Tiny-Formats-MLX-4bit", "Tiny-Formats-W4A16"]
    awq, ct, mlx = (rows[f"Tiny-Formats-{k}"] for k in ("AWQ", "W4A16", "MLX-4bit"))
    assert ct["kld_mean"] == awq["kld_mean"] and ct["ppl"] == awq["ppl"] and ct["quant"] == "W4A16"
    assert ct["same_weights_as"] == "Tiny-Formats-AWQ" and "same_weights_as" not in awq   # measured once
    assert mlx["quant"] == "MLX-4bit" and 0 < mlx["kld_mean"] < 0.3 and report["gate"]["passed"]
    # MLX from the AWQ pass (mlx.source auto with an awq: section): its calibration facts travel with the codes
    assert (work / "Tiny-Formats-MLX-4bit" / "awq_calibration.json").read_bytes() == \
        (work / "Tiny-Formats-AWQ" / "awq_calibration.json").read_bytes()
    main_card = (work / "Tiny-Formats" / "README.md").read_text()
    for repo in ("alice/Tiny-Formats-AWQ", "alice/Tiny-Formats-W4A16", "alice/Tiny-Formats-MLX-4bit"):
        assert f"[{repo}](https://huggingface.co/{repo})" in main_card
    for row in (awq, mlx):
        assert f"{row['ppl']:.3f}" in main_card
    ct_card = (work / "Tiny-Formats-W4A16" / "README.md").read_text()
    assert "vllm serve alice/Tiny-Formats-W4A16" in ct_card and "CompressedTensorsConfig(dequantize=True)" in ct_card
    assert "library_name: transformers" in ct_card and "compressed-tensors" in ct_card
    mlx_card = (work / "Tiny-Formats-MLX-4bit" / "README.md").read_text()
    assert "mlx_lm.generate --model alice/Tiny-Formats-MLX-4bit" in mlx_card and "library_name: mlx" in mlx_card
    assert "the codes of an AWQ pass" in mlx_card and "| Embedding and output head | 8-bit |" in mlx_card
    for repo in ("Tiny-Formats-W4A16", "Tiny-Formats-MLX-4bit"):
        published = work / "published" / "alice" / repo
        assert (published / "README.md").read_bytes() == (work / repo / "README.md").read_bytes()
    before = (work / "release.json").read_bytes()
    run_release(recipe, work)
    after = json.loads((work / "release.json").read_text())
    assert {k: v["files"] for k, v in after["stages"].items()} == \
        {k: v["files"] for k, v in json.loads(before)["stages"].items()}


def test_gate_refuses_a_format_folder_whose_tokenizer_differs(tmp_path):
    from releaser.errors import GateError
    from releaser.pipeline.run import run_release

    model = _model(tmp_path, "qwen3")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: alice/Tiny-Gate\ndescription: d.\nstop_audit: false\nmodel: {model}\nmlx: {{}}\nquality: false\n")
    work = tmp_path / "work"
    run_release(recipe, work, skip=["publish"])
    config = work / "Tiny-Gate-MLX-4bit" / "tokenizer_config.json"
    config.write_text(config.read_text().replace("}", ', "x": 1}', 1))
    with pytest.raises(GateError, match="Tiny-Gate-MLX-4bit: tokenizer_config.json differs from the main folder's"):
        run_release(recipe, work, only=["publish"])


# ------------------------------------------------------------------------------------------------------------ CLI


def test_cli_w4a16_and_mlx_write_folders_and_say_so_in_one_line(w4a16, tmp_path):
    """`releaser w4a16 AWQ_DIR -o OUT` and `releaser mlx MODEL_DIR -o OUT` (of the unquantized folder with the
    flags, of the AWQ folder with the defaults): a summary line each; bad input is one line and no folder."""
    from typer.testing import CliRunner

    from releaser.cli import app

    model, awq, _, _ = w4a16
    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])   # noqa: E731
    r = run("w4a16", awq, "-o", tmp_path / "ct", "-q")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("w4a16 W4A16 (compressed-tensors pack-quantized, g32)") and "linears" in r.output
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["format"] == \
        "pack-quantized"
    r = run("mlx", model, "-o", tmp_path / "rtn", "--bits", "8", "--group-size", "32", "--embedding-bits", "16", "-q")
    assert r.exit_code == 0, r.output
    assert "MLX 8-bit g32 of" in r.output and "rounded by MLX" in r.output
    q = json.loads((tmp_path / "rtn" / "config.json").read_text())["quantization"]
    assert q == {"group_size": 32, "bits": 8, "mode": "affine"}   # embedding and head kept in float: no entry
    r = run("mlx", awq, "-o", tmp_path / "awq", "-q")
    assert r.exit_code == 0, r.output
    assert "MLX 4-bit g32 of tiny-AWQ (AWQ codes repacked)" in r.output
    for args, words in ((("mlx", awq, "-o", tmp_path / "x", "--bits", "8"), "bits 4"),
                        (("mlx", model, "-o", tmp_path / "x", "--group-size", "48"), "--group-size: Input should be 32, 64 or 128"),
                        (("w4a16", model, "-o", tmp_path / "x"), "not an AWQ checkpoint"),
                        (("mlx", tmp_path / "ct", "-o", tmp_path / "x"), "already quantized")):
        r = run(*args)
        assert r.exit_code != 0 and words in r.output, (args, r.output)
        assert r.output.startswith("error:") and r.output.count("\n") == 1, r.output
        assert not (tmp_path / "x").exists()


def test_recipe_mlx_source_auto_is_awq_with_an_awq_pass_and_awq_needs_one():
    from releaser.errors import ReleaserError
    from releaser.recipe import Recipe

    base = {"name": "a/B", "description": "d", "model": "m"}
    assert Recipe(**base, mlx={}).mlx_source == "rtn"
    assert Recipe(**base, mlx={}, awq={}).mlx_source == "awq"
    assert Recipe(**base, mlx={"bits": 8}, awq={}).mlx_source == "rtn"
    assert Recipe(**base, mlx={"source": "rtn"}, awq={}).mlx_source == "rtn"
    assert Recipe(**base).mlx_source is None
    for mlx, awq, words in (({"source": "awq"}, None, "no awq: section"),
                            ({"source": "awq", "bits": 8}, {}, "set bits 4")):
        with pytest.raises((ReleaserError, ValueError)) as exc:
            Recipe(**base, mlx=mlx, **({"awq": awq} if awq is not None else {}))
        assert words in str(exc.value)


def test_awq_left_out_leaves_out_what_is_made_of_it(tmp_path):
    """--skip awq on a fresh work folder: W4A16 and MLX from the AWQ codes are not applicable (no folder to make them
    of), not a missing-folder error; MLX rounded by MLX still runs."""
    from releaser.pipeline.run import run_release

    model = _model(tmp_path, "qwen3")
    recipe = tmp_path / "r.yaml"
    text = f"name: alice/Tiny-Skip\ndescription: d.\nstop_audit: false\nmodel: {model}\nquality: false\n" \
           "awq: {samples: 8, seqlen: 64, formats: [autoawq, compressed-tensors]}\n"
    recipe.write_text(text + "mlx: {group_size: 32}\n")
    result = run_release(recipe, tmp_path / "w1", skip=["awq", "publish"])
    status = {s.name: (s.status, s.reason) for s in result.stages}
    assert status["w4a16"] == status["mlx"] == ("not applicable", "no AWQ folder in this run (awq left out and never "
                                                                  "made)"), status
    assert not (tmp_path / "w1" / "Tiny-Skip-MLX-4bit").exists()
    recipe.write_text(text + "mlx: {group_size: 32, source: rtn}\n")
    result = run_release(recipe, tmp_path / "w2", skip=["awq", "publish"])
    assert {s.name: s.status for s in result.stages}["mlx"] == "ran"
    assert (tmp_path / "w2" / "Tiny-Skip-MLX-4bit" / "README.md").is_file()
