"""K-quant mixes per family: our Q4_K_M file of a tiny model whose every row is a multiple of 256 (hidden 256,
intermediate 512, 4 heads of 64) has the tensors (names, types, bytes) and keys of llama.cpp's own
``convert_hf_to_gguf.py`` F32 file quantized by ``llama_model_quantize``. Families whose mix differs from Llama's
(tied output, QK-norm, Gemma's four norms, Phi-3's fused qkv) are where a per-architecture rule would show."""

from __future__ import annotations

import json
import shutil

import pytest

from releaser.arch import architecture_for
from releaser.gguf import export_gguf
from releaser_testing import tiny_family_model

import gguf_oracle as o  # noqa: E402 - skips (outside CI) without llama-cpp-python

pytestmark = pytest.mark.slow  # external oracles

FAMILIES = ["qwen3", "gemma3", "phi3", "olmo2", "smollm3"]
SHAPE = dict(hidden=256, intermediate=512, heads=4, kv_heads=2)
EXTRA = {"qwen3": dict(head_dim=64), "gemma3": dict(head_dim=64, query_pre_attn_scalar=64)}   # Phi-3: hidden / heads


@pytest.fixture(scope="module")
def kquant_files(tmp_path_factory, smollm2):
    root = tmp_path_factory.mktemp("kquants")
    out = {}
    for fam in FAMILIES:
        model = tiny_family_model(root / fam, fam, seed=0, **SHAPE, **EXTRA.get(fam, {}))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(smollm2 / f, model / f)
        if fam == "phi3":   # llama.cpp's Phi3 converter reads a GPT2Tokenizer as BPE (see test_arch_families.py)
            cfg = json.loads((model / "tokenizer_config.json").read_text())
            (model / "tokenizer_config.json").write_text(json.dumps(cfg | {"tokenizer_class": "GPT2Tokenizer"}))
        ours = export_gguf(model, root / f"{fam}-ours", ["Q4_K_M"], name=f"tiny-{fam}".replace("phi3", "fi"))
        ref_f32 = o.convert_hf(model, root / f"{fam}-ref-F32.gguf", "f32")
        ref = root / f"{fam}-ref-Q4_K_M.gguf"
        o.quantize(ref_f32, ref, "Q4_K_M")
        ref_f32.unlink()
        out[fam] = (model, ours.files["Q4_K_M"][0], ref)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_q4_k_m_equals_llama_quantize(kquant_files, family):
    model, ours_path, ref_path = kquant_files[family]
    ours, theirs = o.tensors(ours_path), o.tensors(ref_path)
    assert {k: v[0] for k, v in ours.items()} == {k: v[0] for k, v in theirs.items()}   # names and types
    assert [k for k in ours if ours[k][1] != theirs[k][1]] == []                          # bytes
    arch = architecture_for(json.loads((model / "config.json").read_text())).gguf_name
    mine, ref = o.keys(ours_path, arch + "."), o.keys(ref_path, arch + ".")
    assert {k for k in mine.keys() | ref.keys() if mine.get(k) != ref.get(k)} == set()
    assert o.keys(ours_path, "general.file_type") == o.keys(ref_path, "general.file_type")
