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
# Q2_K_S/IQ3_XS: tests/test_gguf_imatrix.py, test_gguf_iquants3.py; the IQ3 mixes there too, on a small vocabulary
# (their search is slow on this model's 49152-row embeddings, for llama-quantize as for us)
MIXES = [q for q in QUANT_NAMES if q not in ("F32", "F16", "BF16", *NEEDS_IMATRIX) and not q.startswith("IQ3")]


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


TOOL_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                 "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _stop_folder(path, smollm2, eos_ids, **sampling):
    model = make_model(path, smollm2, layers=1)
    (model / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": eos_ids,
                                                              **sampling}))
    (model / "additional_chat_templates").mkdir()
    (model / "additional_chat_templates" / "tool_use.jinja").write_text(TOOL_TEMPLATE)
    return model


def _read_back(path) -> dict:
    """What llama.cpp reads: its end-of-generation ids among the first 20, the sampling keys, both templates."""
    import llama_cpp

    with o.load(path, vocab_only=True) as m:
        vocab = llama_cpp.llama_model_get_vocab(m)
        return {"eog": [i for i in range(20) if llama_cpp.llama_vocab_is_eog(vocab, i)],
                "sampling": {k: o.meta(m, f"general.sampling.{k}") for k in ("temp", "top_k", "top_p", "min_p",
                                                                              "penalty_repeat")},
                "template": llama_cpp.llama_model_chat_template(m, None).decode(),
                "tool_use": (llama_cpp.llama_model_chat_template(m, b"tool_use") or b"").decode(),
                "add_bos": o.meta(m, "tokenizer.ggml.add_bos_token"), "eom": o.meta(m, "tokenizer.ggml.eom_token_id")}


def test_stop_ids_sampling_and_templates_read_back(tmp_path, smollm2):
    """Every id generation_config.json declares a stop is end-of-generation in llama.cpp (<file_sep> through the eom
    slot: llama.cpp does not know its text), the sampling defaults the folder states are general.sampling.* (with
    repetition_penalty as penalty_repeat, as the vendored converter writes it) and both chat templates are there."""
    from releaser.errors import ModelError
    from releaser.gguf.fix import sync_tokenizer
    from releaser.gguf.reader import GGUFFile
    from releaser.gguf.stops import llama_eog_ids

    model = _stop_folder(tmp_path / "m", smollm2, [2, 5], temperature=0.6, top_p=0.9, top_k=20,
                         repetition_penalty=1.1, do_sample=True)
    f16 = export_gguf(model, tmp_path / "out", ["F16"], name="Stops").files["F16"][0]
    got = _read_back(f16)
    # <|endoftext|> and <|im_end|> by their text, <reponame> as llama.cpp's FIM repo token
    assert got["eog"] == [0, 2, 4, 5] and got["eom"] == "5"
    assert got["sampling"] == {"temp": "0.600000", "top_k": "20", "top_p": "0.900000", "min_p": None,
                               "penalty_repeat": "1.100000"}
    assert got["template"] == (smollm2 / "chat_template.jinja").read_text() and got["tool_use"] == TOOL_TEMPLATE
    assert got["add_bos"] == "false"
    values = GGUFFile(f16).values   # releaser's copy of llama.cpp's rule (FIM tokens left out) agrees with llama.cpp
    special = {k: values.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")}
    assert sorted(i for i in llama_eog_ids(values["tokenizer.ggml.tokens"], special) if i < 20) == [0, 2, 5]

    ref = o.convert_hf(model, tmp_path / "ref.gguf", "f16")   # llama.cpp's converter: the same keys it writes
    ours, theirs = o.keys(f16, "general.sampling."), o.keys(ref, "general.sampling.")
    assert ours == theirs and len(ours) == 4
    ours, theirs = o.keys(f16, "tokenizer."), o.keys(ref, "tokenizer.")
    # ours adds eot (the eos is an end-of-turn token), eom (a declared stop llama.cpp would not stop on) and
    # add_eos false (what the tokenizer does; the converter leaves it out, which llama.cpp reads as false too)
    assert {k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)} == {
        "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id", "tokenizer.ggml.add_eos_token"}
    assert ours["tokenizer.ggml.add_eos_token"] is False and "tokenizer.ggml.add_eos_token" not in theirs

    # a tokenizer-only re-release rewrites the stops and sampling keys in place
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "temperature": 0.3}))
    changes = sync_tokenizer(f16, model).changes
    assert set(changes) == {"tokenizer.ggml.eom_token_id", "general.sampling.temp", "general.sampling.top_k",
                            "general.sampling.top_p", "general.sampling.penalty_repeat"}
    got = _read_back(f16)
    assert got["eog"] == [0, 2, 4] and got["eom"] is None
    assert got["sampling"] == {"temp": "0.300000", "top_k": None, "top_p": None, "min_p": None,
                               "penalty_repeat": None}
    assert sync_tokenizer(f16, model).changes == {}

    # more declared stops than llama.cpp has slots for: refused in one line, naming them
    bad = _stop_folder(tmp_path / "bad", smollm2, [2, 5, 10])
    with pytest.raises(ModelError, match=r"declares stop token\(s\) '<issue_closed>' that llama.cpp cannot stop on"):
        export_gguf(bad, tmp_path / "bad-out", ["F16"], name="Bad")
