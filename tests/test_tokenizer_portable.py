"""Tokenizer files transformers 4.x and 5.x both load (issue 23, item 5): transformers 5 saves
``tokenizer_class: TokenizersBackend`` (a name 4.x does not know), ``model_max_length`` 1e30 and additional special
tokens as a list under ``extra_special_tokens`` (4.x wants a mapping there); the folders releaser writes load in
transformers 4.57 (a small venv without torch, the ``transformers4`` fixture) and in the installed 5.x alike, with
the same tokens, ids and chat rendering. Configs do not keep where a loaded copy came from (``_model_name_or_path``)."""

from __future__ import annotations

import json
import subprocess

import pytest

from releaser.awq.stage import awq_config
from releaser.tokenizer.fix import FixSpec, fix_tokenizer

PROBE = r"""
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
chat = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi <tool> two"}]
print(json.dumps({
    "eos": tok.eos_token, "bos": tok.bos_token, "pad": tok.pad_token, "unk": tok.unk_token,
    "special": sorted(tok.all_special_tokens), "max_length": tok.model_max_length, "size": len(tok),
    "ids": tok("Hello there <tool> two<|im_end|>")["input_ids"],
    "chat": tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=False),
}))
"""


def facts(python, folder) -> dict:
    proc = subprocess.run([str(python), "-c", PROBE, str(folder)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fixed_smollm2(smollm2, tmp_path_factory):
    config = json.loads((smollm2 / "config.json").read_text())
    assert "_model_name_or_path" in config   # what the fixture (loaded from a GGUF by transformers 5) carries
    out = tmp_path_factory.mktemp("fixed") / "main"
    fix_tokenizer(smollm2, FixSpec("chatml", out_dir=out))   # a copy: the input is never changed
    return out


def test_fixed_tokenizer_files_name_what_both_versions_know(fixed_smollm2):
    cfg = json.loads((fixed_smollm2 / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["model_max_length"] == 8192
    assert not {"is_local", "local_files_only", "extra_special_tokens"} & set(cfg)
    config = json.loads((fixed_smollm2 / "config.json").read_text())
    assert not {"_model_name_or_path", "_name_or_path"} & set(config)


def test_transformers_4_and_5_load_the_same_tokenizer(fixed_smollm2, transformers4):
    import sys

    old, new = facts(transformers4, fixed_smollm2), facts(sys.executable, fixed_smollm2)
    assert old == new
    assert old["eos"] == "<|im_end|>" and old["max_length"] == 8192 and old["size"] == 49152


def test_additional_special_tokens_survive_both_versions(tmp_path, transformers4):
    """transformers 5 writes them as a list under extra_special_tokens, which 4.x cannot read: releaser writes them
    as additional_special_tokens, which both read as special tokens."""
    import sys

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from releaser_testing import tiny_model

    words = ["<unk>", "<|im_start|>", "<|im_end|>", "<tool>", "Hello", "there", "two", "Hi", "user", "assistant"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", additional_special_tokens=["<tool>"])
    src = tiny_model(tmp_path / "src", "llama", layers=1, hidden=32, intermediate=64, heads=2, kv_heads=1,
                     vocab=len(words))
    tok.save_pretrained(src)
    assert "extra_special_tokens" in json.loads((src / "tokenizer_config.json").read_text())
    fix_tokenizer(src, FixSpec("chatml", out_dir=tmp_path / "out"))
    cfg = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert cfg["additional_special_tokens"] == ["<tool>"] and "model_max_length" in cfg
    old, new = facts(transformers4, tmp_path / "out"), facts(sys.executable, tmp_path / "out")
    assert old == new and "<tool>" in old["special"]


def test_quant_configs_drop_where_the_model_was_loaded_from():
    from releaser.formats.mlx import mlx_config

    config = {"_model_name_or_path": "Smollm2 135M", "_name_or_path": "/tmp/x", "hidden_size": 8}
    for out in (awq_config(config, 4, 128), mlx_config(config, 4, 64)):   # W4A16's is the AWQ folder's
        assert "_model_name_or_path" not in out and "_name_or_path" not in out and out["hidden_size"] == 8
