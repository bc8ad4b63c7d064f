"""GGUF export on tiny random models (SmolLM2's tokenizer), with llama.cpp (llama-cpp-python) as the oracle."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from releaser.gguf import QUANT_NAMES, export_gguf
from releaser.gguf.mixes import NEEDS_IMATRIX
from releaser_testing import tiny_model

import gguf_oracle as o  # noqa: E402 - skips (outside CI) without llama-cpp-python
pytestmark = pytest.mark.slow  # llama.cpp is an external oracle

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
MIXES = [q for q in QUANT_NAMES if q not in ("F32", "F16", "BF16", *NEEDS_IMATRIX)]   # tests/test_gguf_imatrix.py


def make_model(path, smollm2, arch="llama", **kw):
    cfg = dict(layers=8, hidden=256, intermediate=512, heads=4, kv_heads=1, vocab=49152) | kw
    tiny_model(path, arch, seed=3, **cfg)
    for f in TOKENIZER_FILES:
        shutil.copy(smollm2 / f, path / f)
    return path


def hf_logits(model_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].numpy()


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2):
    """A 256-divisible 8-layer Llama (n_gqa 4, untied) exported to F32 and every mix in one pass."""
    root = tmp_path_factory.mktemp("gguf-tiny")
    model = make_model(root / "model", smollm2)
    result = export_gguf(model, root / "out", ["F32", *MIXES], name="Tiny-Llama")
    return model, result


def test_one_pass_writes_every_type_with_hub_names(tiny):
    _, result = tiny
    assert sorted(p.name for p in result.out_dir.iterdir()) == sorted(f"Tiny-Llama-{q}.gguf" for q in ["F32", *MIXES])
    assert result.tokenizer.model == "gpt2" and result.tokenizer.pre == "smollm"


@pytest.mark.parametrize("quant", MIXES)
def test_mix_types_and_bytes_equal_llama_quantize(tiny, tmp_path, quant):
    _, result = tiny
    ref = tmp_path / "ref.gguf"
    o.quantize(result.files["F32"][0], ref, quant)
    ours, theirs = o.tensors(result.files[quant][0]), o.tensors(ref)
    assert {k: v[0] for k, v in ours.items()} == {k: v[0] for k, v in theirs.items()}
    assert [k for k in ours if ours[k][1] != theirs[k][1]] == []


def test_llama_cpp_logits_match_transformers(tiny):
    model, result = tiny
    ids = [1, 504, 3458, 282, 4649, 314, 8, 2]
    with o.load(result.files["F32"][0]) as m:
        ours = o.last_logits(m, ids)
    assert rel_err(ours, hf_logits(model, ids)) < 1e-3
    with o.load(result.files["Q4_K_M"][0]) as m:  # quantized files load and decode too
        assert np.isfinite(o.last_logits(m, ids)).all()


@pytest.mark.parametrize("arch,kw", [("mistral", dict(head_dim=128, kv_heads=2)), ("qwen2", dict(kv_heads=2)),
                                     ("llama", dict(tied=True, kv_heads=4))])
def test_architectures_logits(tmp_path, smollm2, arch, kw):
    """Mistral-Nemo-style explicit head_dim (!= hidden/heads), Qwen2 (biases, no permutation), tied embeddings."""
    model = make_model(tmp_path / "m", smollm2, arch, layers=2, **kw)
    # transformers gives a qwen2 model_type Qwen2's own pre-tokenizer regex, so SmolLM2's vocab hashes as unknown
    pre = "qwen2" if arch == "qwen2" else None
    result = export_gguf(model, tmp_path / "out", ["F32", "Q4_K_M"], pre_tokenizer=pre)
    ids = [1, 504, 3458, 282, 4649, 314]
    with o.load(result.files["F32"][0]) as m:
        assert o.meta(m, "general.architecture") == ("qwen2" if arch == "qwen2" else "llama")
        ours = o.last_logits(m, ids)
    assert rel_err(ours, hf_logits(model, ids)) < 1e-3
    types = result.tensor_types["Q4_K_M"]
    assert ("output.weight" in types) != kw.get("tied", False)
    if kw.get("tied"):
        assert types["token_embd.weight"] == "Q6_K"  # the tied embedding gets the output type


def test_split_files(tmp_path, smollm2):
    model = make_model(tmp_path / "m", smollm2, layers=2)
    result = export_gguf(model, tmp_path / "out", ["Q8_0"], name="Split", split_max_size="10M")
    names = [p.name for p in result.files["Q8_0"]]
    n = len(names)
    assert n >= 2 and names == [f"Split-Q8_0-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    with o.load(result.files["Q8_0"][0]) as m:
        assert o.meta(m, "split.count") == str(n)
        assert o.meta(m, "general.name") == "Split"


def test_metadata(tmp_path, smollm2):
    model = make_model(tmp_path / "m", smollm2, layers=2)
    result = export_gguf(model, tmp_path / "out", ["F16"], name="Meta-Test", license="apache-2.0",
                         tags=["merge"], base_models=["org/base-model"], quantized_by="releaser")
    with o.load(result.files["F16"][0], vocab_only=True) as m:
        got = {k: o.meta(m, k) for k in ("general.name", "general.license", "general.quantized_by",
                                        "general.base_model.count", "general.base_model.0.repo_url",
                                        "general.file_type", "general.quantization_version",
                                        "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                        "tokenizer.ggml.bos_token_id", "tokenizer.ggml.add_bos_token",
                                        "llama.rope.dimension_count", "llama.attention.head_count_kv")}
        template = o.meta(m, "tokenizer.chat_template")
    assert got == {"general.name": "Meta-Test", "general.license": "apache-2.0", "general.quantized_by": "releaser",
                   "general.base_model.count": "1", "general.base_model.0.repo_url": "https://huggingface.co/org/base-model",
                   "general.file_type": "1", "general.quantization_version": "2",
                   "tokenizer.ggml.eos_token_id": "2", "tokenizer.ggml.eot_token_id": "2",
                   "tokenizer.ggml.bos_token_id": "1", "tokenizer.ggml.add_bos_token": "false",
                   "llama.rope.dimension_count": "64", "llama.attention.head_count_kv": "1"}
    assert template == (smollm2 / "chat_template.jinja").read_text()


def spm_style_tokenizer(folder):
    """A Llama-2/Mistral-style byte-fallback BPE tokenizer.json (SentencePiece converted), trained on a small text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    text = ["Hello world, this is a small corpus for a tiny byte-fallback BPE tokenizer.",
            "Llama and Mistral use SentencePiece with byte fallback; Привет мир; 你好世界; numbers 12345."] * 50
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    special = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=600, special_tokens=special, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
        "tokenizer_class": "LlamaTokenizerFast"}))
    return tok.get_vocab_size()


def test_sentencepiece_style_vocab(tmp_path):
    import gguf
    from transformers import AutoTokenizer

    (tmp_path / "m").mkdir()
    n_vocab = spm_style_tokenizer(tmp_path / "m")
    model = tiny_model(tmp_path / "m", "llama", layers=1, hidden=64, intermediate=128, vocab=n_vocab)
    result = export_gguf(model, tmp_path / "out", ["F16"])
    assert (result.tokenizer.model, result.tokenizer.pre) == ("llama", "default")
    text = "Hello Llama! Привет 你好 ☃ 12345"
    with o.load(result.files["F16"][0], vocab_only=True) as m:
        assert o.tokenize(m, text, add_special=True) == AutoTokenizer.from_pretrained(model).encode(text)
        assert o.meta(m, "tokenizer.ggml.add_bos_token") == "true"
    reader = gguf.GGUFReader(result.files["F16"][0])
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    types = reader.get_field("tokenizer.ggml.token_type").contents()
    assert len(reader.get_field("tokenizer.ggml.scores").contents()) == len(tokens) == n_vocab
    assert types[tokens.index("<0x41>")] == gguf.TokenType.BYTE and types[tokens.index("<s>")] == gguf.TokenType.CONTROL
