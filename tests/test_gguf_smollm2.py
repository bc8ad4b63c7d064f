"""GGUF export of the real SmolLM2-135M-Instruct (hidden 576: K-quant fallbacks), with llama.cpp as the oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from releaser.gguf import export_gguf

o = pytest.importorskip("gguf_oracle")
pytestmark = pytest.mark.slow

QUANTS = ["F32", "F16", "Q4_K_M", "Q5_K_M", "Q2_K"]
TEXT = ("<|im_start|>user\nHello wörld! Привет, мир. 你好，世界。 こんにちは 🦙🚀 3.14159 it's   spaced\tout"
        "<|im_end|>\n<|im_start|>assistant\nÇa va? ¿Qué tal? नमस्ते<|endoftext|>")


@pytest.fixture(scope="module")
def export(tmp_path_factory, smollm2):
    return export_gguf(smollm2, tmp_path_factory.mktemp("gguf-smollm2"), QUANTS, name="SmolLM2-135M-Instruct")


@pytest.fixture(scope="module")
def hf(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2), AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)


def test_files_and_tokenizer_metadata(export):
    assert [p.name for ps in export.files.values() for p in ps] == [f"SmolLM2-135M-Instruct-{q}.gguf" for q in QUANTS]
    assert (export.tokenizer.model, export.tokenizer.pre, export.tokenizer.eos) == ("gpt2", "smollm", "<|im_end|>")


def test_tokenization_equals_transformers(export, hf):
    tok, _ = hf
    with o.load(export.files["F16"][0], vocab_only=True) as m:
        assert o.tokenize(m, TEXT, add_special=True) == tok.encode(TEXT)
        assert o.tokenize(m, "plain text, no specials") == tok.encode("plain text, no specials")


@pytest.mark.parametrize("quant", ["F32", "F16"])
def test_logits_match_transformers(export, hf, quant):
    tok, model = hf
    ids = tok.encode("The capital of France is")
    with o.load(export.files[quant][0]) as m:
        ours = o.last_logits(m, ids)
    state = model.state_dict()
    if quant == "F16":  # the reference runs the same fp16-rounded weights in float32
        model.load_state_dict({k: v.half().float() for k, v in state.items()})
    try:
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0, -1].numpy()
    finally:
        model.load_state_dict(state)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-3


def test_q4_k_m_chat_generation_stops_at_im_end(export, hf):
    tok, _ = hf
    # (llama.cpp quantizes activations to 8 bits; on this 135M model some prompts then drift, this one is stable)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}],
                                     add_generation_prompt=True, tokenize=False)
    with o.load(export.files["Q4_K_M"][0]) as m:
        assert o.meta(m, "tokenizer.chat_template") == tok.chat_template
        out = o.generate(m, o.tokenize(m, prompt), max_new=64)
    text = tok.decode(out)
    assert out[-1] == tok.convert_tokens_to_ids("<|im_end|>"), text
    assert "4" in text


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q5_K_M", "Q2_K"])
def test_mix_equals_llama_quantize_with_576_columns(export, tmp_path, quant):
    ref = tmp_path / "ref.gguf"
    o.quantize(export.files["F32"][0], ref, quant)
    ours, theirs = o.tensors(export.files[quant][0]), o.tensors(ref)
    assert {k: v[0] for k, v in ours.items()} == {k: v[0] for k, v in theirs.items()}
    assert [k for k in ours if ours[k][1] != theirs[k][1]] == []
    # 576-wide rows fall back (Q4_K -> Q5_0, Q5_K -> Q5_1, Q2_K/Q3_K -> Q4_0, Q6_K -> Q8_0); 1536-wide ffn_down does not
    fallback = {"Q4_K_M": "Q5_0", "Q5_K_M": "Q5_1", "Q2_K": "Q4_0"}[quant]
    assert export.tensor_types[quant]["blk.5.attn_q.weight"] == fallback
    assert export.tensor_types[quant]["token_embd.weight"] == "Q8_0"
    assert export.tensor_types[quant]["blk.5.ffn_down.weight"].endswith("_K")
