"""AWQ GEMM artefacts evaluated from their own bytes (tiny models): nibble order, dequantization, and the quality
stage on an AWQ folder quantized here with plain round-to-nearest; plus the evaluation text and option errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from releaser.errors import ConfigError, ModelError
from releaser.quality import QualityGateError, QualityOptions, run_quality
from releaser.awq.pack import unpack as unpack_gemm
from releaser.quality import load as ld
from releaser.quality.text import BUILTIN, load_text, make_windows
from releaser_testing import awq_gemm_pack as pack, rtn_awq, tiny_awq, tiny_model, tiny_tokenizer

REV = [0, 4, 1, 5, 2, 6, 3, 7]   # logical column 8c + j lives in nibble REV[j]


def test_unpack_golden_words():
    assert unpack_gemm(torch.tensor([[0x75316420]], dtype=torch.int32)).tolist() == [list(range(8))]
    negative = torch.from_numpy(pack(np.array([[15, 0, 0, 0, 0, 0, 0, 15]])))
    assert int(negative) < 0
    assert unpack_gemm(negative).tolist() == [[15, 0, 0, 0, 0, 0, 0, 15]]
    rng = np.random.default_rng(0)
    values = rng.integers(0, 16, (5, 64))
    assert np.array_equal(unpack_gemm(torch.from_numpy(pack(values))).numpy(), values)


def test_tiny_awq_loads_with_the_gemm_formula(tmp_path):
    folder = tiny_awq(tmp_path / "awq", group_size=32)
    model = ld.load(ld.identify(folder), {})
    from safetensors.numpy import load_file

    raw = load_file(folder / "model.safetensors")
    prefix = "model.layers.1.mlp.down_proj"
    qw, qz, sc = raw[prefix + ".qweight"].view(np.uint32), raw[prefix + ".qzeros"].view(np.uint32), raw[prefix + ".scales"]
    k, n = qw.shape[0], qw.shape[1] * 8
    expected = np.empty((n, k), dtype=np.float32)
    for kk in range(k):                       # element by element, through the inverse order
        for nn in range(n):
            q = (qw[kk, nn // 8] >> (4 * REV[nn % 8])) & 0xF
            z = (qz[kk // 32, nn // 8] >> (4 * REV[nn % 8])) & 0xF
            expected[nn, kk] = (float(q) - float(z)) * float(sc[kk // 32, nn])
    got = model.state_dict()[prefix + ".weight"].numpy()
    assert np.array_equal(got, expected)
    assert np.array_equal(model.state_dict()["model.norm.weight"].numpy(), raw["model.norm.weight"].astype(np.float32))


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-awq-release")
    base = tiny_tokenizer(tiny_model(root / "model", seed=3))
    return base, rtn_awq(base, root / "model-AWQ")


def test_awq_folder_is_measured(tiny_release, tmp_path):
    base, awq = tiny_release
    out = tmp_path / "quality.json"
    result = run_quality(QualityOptions(ctx=64, chunks=2, stop_test=False), base, [awq], out)
    row = result.facts["artefacts"][0]
    assert (row["kind"], row["quant"], row["file"], row["backend"]) == ("awq", "AWQ", "model-AWQ", "torch")
    assert 0 < row["kld_mean"] < 0.05 and row["same_top"] > 0.5   # a random model: flat distributions
    assert result.facts["scored_tokens"] == 2 * 31
    assert json.loads(out.read_text())["artefacts"][0]["kld_mean"] == row["kld_mean"]


def test_broken_awq_scales_fail_the_gate(tiny_release, tmp_path):
    """A random tiny model's distributions are flat, so every KLD is small: the limit is set for it (the good folder
    gives 0.004, scales 4x too large 0.12)."""
    base, awq = tiny_release
    options = QualityOptions(ctx=64, chunks=2, stop_test=False, max_kld={"AWQ": 0.05})
    assert run_quality(options, base, [awq], tmp_path / "q.json").facts["artefacts"][0]["max_kld"] == 0.05
    broken = rtn_awq(base, tmp_path / "Broken-AWQ", scale_factor=4.0)
    with pytest.raises(QualityGateError, match=r"Broken-AWQ: mean KLD .* far above what AWQ gives \(limit 0.05\)"):
        run_quality(options, base, [broken], tmp_path / "q.json")


def test_awq_with_another_tokenizer_fails_the_gate(tiny_release, tmp_path):
    base, awq = tiny_release
    other = tmp_path / "Other-AWQ"
    shutil.copytree(awq, other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab[","], vocab["."] = vocab["."], vocab[","]        # two ids swapped: the same words, other ids
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(QualityGateError, match="Other-AWQ: it tokenizes the text differently"):
        run_quality(QualityOptions(ctx=64, chunks=1, stop_test=False), base, [other], tmp_path / "q.json")


@pytest.mark.parametrize("which", ["model", "awq"])
def test_streamed_model_holds_one_layer_and_gives_the_whole_models_logits(tiny_release, which):
    """The quality stage runs every model streamed (one decoder layer's weights in memory at a time): its logits equal
    those of the whole model bit for bit, every layer is loaded once per forward pass, and no two are loaded at once."""
    base, awq = tiny_release
    tokens = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(0))
    art = base if which == "model" else ld.identify(awq)
    with ld.open_weights(art, ld.read_config(base)) as weights:
        whole = ld.build(weights)
        expected = [torch.cat(list(w)) for w in ld.scored_logits(whole, 16)(tokens)]
        seen, done = [], []
        model = ld.streamed(weights, lambda: done.append(loaded()))
        layers = model.model.layers

        def loaded():
            return [i for i, layer in enumerate(layers) if any(p.numel() for p in layer.parameters())]

        for layer in layers:   # runs after the streamed model's own hook has loaded the layer
            layer.register_forward_pre_hook(lambda module, args: seen.append(loaded()))
        assert loaded() == []
        got = [torch.cat(list(w)) for w in ld.scored_logits(model, 16)(tokens)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected)) and len(got) == 3
    assert seen == [[i] for i in range(len(layers))], "one forward pass: each layer in turn, alone"
    assert done == [[]] * len(layers), "each layer dropped after it ran"


def test_builtin_text_and_windows(tiny_release):
    from transformers import AutoTokenizer

    text = load_text("builtin")
    assert text.text == BUILTIN.read_text(encoding="utf-8") and "Origin of Species" in text.name
    assert not (BUILTIN.parent.parent.parent / "awq" / "data" / BUILTIN.name).exists()
    tok = AutoTokenizer.from_pretrained(tiny_release[0])
    w = make_windows(tok, text, 64, 3)
    assert w.tokens.shape == (3, 64) and w.first == 32 and w.targets.shape == (3, 31)
    assert torch.equal(w.tokens.flatten(), torch.tensor(tok(text.text, add_special_tokens=False)["input_ids"][:192]))


def test_bad_inputs_are_one_line_errors(tiny_release, tmp_path):
    base, awq = tiny_release
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(ConfigError, match="fewer than one window"):
        run_quality(QualityOptions(text=str(tmp_path / "short.txt")), base, [awq], tmp_path / "q.json")
    with pytest.raises(ConfigError, match="does not exist"):
        load_text(tmp_path / "nope.txt")
    with pytest.raises(ModelError, match="neither a .gguf file nor a quantized model folder"):
        run_quality(QualityOptions(), base, [tmp_path / "short.txt"], tmp_path / "q.json")
    with pytest.raises(ModelError, match="is not a quantized folder releaser reads"):
        run_quality(QualityOptions(), base, [base], tmp_path / "q.json")
    with pytest.raises(ConfigError, match="no artefacts"):
        run_quality(QualityOptions(), base, [], tmp_path / "q.json")
    with pytest.raises(ValueError):
        QualityOptions(chunks=0)
    assert not (tmp_path / "q.json").exists()


def test_time_budget_cuts_the_windows(tiny_release, tmp_path):
    from releaser.stage import Reporter

    class Collect(Reporter):
        def __init__(self):
            self.warnings = []

        def warning(self, text):
            self.warnings.append(text)

    base, awq = tiny_release
    rep = Collect()
    result = run_quality(QualityOptions(ctx=64, chunks=3, stop_test=False, time_budget=0.001), base, [awq],
                         tmp_path / "q.json", rep)
    assert result.facts["chunks"] == 1 and result.facts["artefacts"][0]["windows"] == 1
    assert any("time budget 0.001 s: measuring 1 window(s) instead of 3" in w for w in rep.warnings)


def test_eval_cli_option_errors(tiny_release, tmp_path):
    from typer.testing import CliRunner

    from releaser.cli import app

    base, awq = tiny_release
    for args, message in ((["--backend", "onnx"], "--backend: Input should be 'torch' or 'llama.cpp'"),
                          (["--chunks", "0"], "--chunks: Input should be greater than or equal to 1")):
        res = CliRunner().invoke(app, ["eval", str(base), str(awq), "-o", str(tmp_path / "q.json"), *args])
        assert res.exit_code == 2 and message in res.output, res.output


def test_stop_verdict_compares_with_the_unquantized_model():
    """The quant fails the stop test only when the unquantized model ends its turn and the quant does not."""
    from releaser.quality.gate import StopResult, stop_verdict

    ends, rambles = StopResult(True, "4<|im_end|>", 3, "<|im_end|>"), StopResult(False, "2 + 2 is ...", 256, None)
    assert stop_verdict(ends, ends)["passed"] and stop_verdict(ends, ends)["conclusive"]
    broken = stop_verdict(rambles, ends)
    assert not broken["passed"] and broken["conclusive"] and broken["unquantized"]["tokens"] == 3
    both = stop_verdict(rambles, rambles)          # a rambling model: says nothing about the quant
    assert both["passed"] and not both["conclusive"]
    assert stop_verdict(ends, rambles)["passed"]
