"""Per-tensor types (`--tensor-type REGEX=TYPE`, `--output-tensor-type`, `--token-embedding-type`, `--pure`, named
custom recipes): our files have the tensors (names, types, bytes) of llama.cpp's `llama-quantize` with the same
arguments on llama.cpp's own F32 conversion. The tiny Qwen3 models have 8 layers (the mixes' layer rules differ per
layer) and an FFN width of 320, which no 256-block type can take (llama.cpp's fallbacks)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from releaser.errors import ConfigError
from releaser.gguf import export_gguf
from releaser.gguf.mixes import quant_spec
from releaser_testing import tiny_family_model

import gguf_oracle as o  # noqa: E402

pytestmark = pytest.mark.slow  # external oracles

CASES = {   # id -> (tied, recipe entry)
    "patterns": (False, {"name": "Q4_K_X", "base": "Q4_K_M",
                         "tensor_types": {"attn_v": "q8_0", r"blk\.[0-2]\.ffn_down": "Q5_K", "ffn_up": "q6_k",
                                          "attn_q": "q4_k"}}),
    "q4_k_l": (False, {"name": "Q4_K_L", "base": "Q4_K_M", "output_type": "Q8_0", "embedding_type": "Q8_0"}),
    "pure": (False, {"name": "Q3_K_M-pure", "base": "Q3_K_M", "pure": True}),
    "tied-output": (True, {"name": "Q4_K_O", "base": "Q4_K_M", "output_type": "q8_0"}),
    "tied-embedding": (True, {"name": "Q5_K_E", "base": "Q5_K_M", "embedding_type": "f16",
                              "tensor_types": {"ffn_down": "q6_k"}}),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm2):
    root = tmp_path_factory.mktemp("tensor-types")
    out = {}
    for tied in (False, True):
        model = tiny_family_model(root / f"qwen3-{tied}", "qwen3", layers=8, hidden=256, intermediate=320, heads=4,
                                  kv_heads=2, head_dim=64, tied=tied)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(smollm2 / f, model / f)
        out[tied] = (model, o.convert_hf(model, root / f"qwen3-{tied}-F32.gguf", "f32"))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_equals_llama_quantize(models, llama_tools, case, tmp_path):
    tied, entry = CASES[case]
    model, f32 = models[tied]
    spec = quant_spec(entry)
    ours = export_gguf(model, tmp_path / "ours", [spec], name="tiny").files[spec.name][0]
    assert ours.name == f"tiny-{spec.name}.gguf"
    ref = tmp_path / "ref.gguf"
    proc = subprocess.run([str(llama_tools / "llama-quantize"), *spec.quantize_args(), str(f32), str(ref), spec.base,
                           "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    mine, theirs = o.tensors(ours), o.tensors(ref)
    assert {k: v[0] for k, v in mine.items()} == {k: v[0] for k, v in theirs.items()}   # names and types
    assert [k for k in mine if mine[k][1] != theirs[k][1]] == []                          # bytes
    assert o.keys(ours, "general.file_type") == o.keys(ref, "general.file_type")
    assert o.keys(ours, "quantize.recipe.args")["quantize.recipe.args"] == spec.quantize_args()


def test_counters_skip_overridden_tensors(models, tmp_path):
    """llama.cpp counts attn_v and ffn_down tensors only when its mix rule runs: with blocks 0-2's ffn_down
    overridden (Q5_K, which width 320 turns into Q5_1), block 3's ffn_down is the mix's first, so Q4_K_M's more-bits
    rule picks blocks 3 and 6 (Q6_K -> Q8_0), not 3, 6 and 7 as the block numbers would."""
    model, _ = models[False]
    spec = quant_spec(CASES["patterns"][1])
    types = export_gguf(model, tmp_path, [spec], name="tiny").tensor_types[spec.name]
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(8)] == ["Q5_1"] * 3 + ["Q8_0", "Q5_0", "Q5_0", "Q8_0",
                                                                             "Q5_0"]


@pytest.mark.parametrize("entry, message", [
    ({"name": "Q4_K_X", "base": "Q9_K"}, "unknown base type Q9_K"),
    ({"name": "Q4_K_X", "base": "Q4_K_M", "output_type": "q7_0"}, "unknown tensor type 'q7_0'"),
    ({"name": "Q4_K_X", "base": "Q4_K_M", "tensor_types": {"attn_v[": "q8_0"}}, "is not a regular expression"),
    ({"name": "Q4_K_X", "base": "Q4_K_M"}, "without overrides"),
    ({"name": "Q6_K", "base": "Q4_K_M", "pure": True}, "cannot take a llama.cpp type's name"),
    ({"name": "a/b", "base": "Q4_K_M", "pure": True}, "part of a file name"),
    ({"base": "Q4_K_M", "pure": True}, "needs a name"),
    ({"name": "X", "base": "Q4_K_M", "output": "q8_0"}, "unknown field 'output'"),
])
def test_bad_recipes_are_one_line(entry, message):
    with pytest.raises(ConfigError, match=message) as e:
        quant_spec(entry)
    assert "\n" not in str(e.value)


def test_pattern_matching_no_tensor_is_one_line(models, tmp_path):
    model, _ = models[False]
    spec = quant_spec({"name": "Q4_K_X", "base": "Q4_K_M", "tensor_types": {"attn_v": "q8_0", "mlp.down": "q6_k"}})
    with pytest.raises(ConfigError, match=r"GGUF quant Q4_K_X: tensor type pattern 'mlp.down' matches no tensor of "
                                          r"this model \(GGUF names such as blk\.0\.\w+\.weight\); fix the pattern$"):
        export_gguf(model, tmp_path, [spec], name="tiny")
    assert not any(tmp_path.iterdir())


def test_card_names_the_recipe(models, tmp_path):
    """The GGUF card lists a custom recipe under its own name with the llama-quantize arguments that remake it."""
    from releaser.card import render_card
    from releaser.gguf.options import GGUFOptions

    model, _ = models[False]
    options = GGUFOptions(quants=["Q4_K_M", CASES["q4_k_l"][1]])
    assert [s.name for s in options.specs()] == ["Q4_K_M", "Q4_K_L"]
    export_gguf(model, tmp_path / "gguf", options.specs(), name="tiny")
    card = render_card(tmp_path / "gguf")
    assert "| tiny-Q4_K_L.gguf | Q4_K_L |" in card, card
    assert "Q4_K_M with `--output-tensor-type q8_0 --token-embedding-type q8_0`" in card, card
    # section-wide overrides apply to every entry that does not set its own
    shared = GGUFOptions(quants=["Q4_K_M", {"name": "Q3_X", "base": "Q3_K_M", "tensor_types": {"ffn": "q4_k"}}],
                         tensor_types={"attn_v": "q8_0"}, output_type="q6_k").specs()
    assert shared[0].tensor_types == (("attn_v", "Q8_0"),) and shared[0].output_type == "Q6_K"
    assert shared[1].tensor_types == (("ffn", "Q4_K"),) and shared[1].output_type == "Q6_K"
