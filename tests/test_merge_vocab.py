"""tokenizer_source base / union / a model: vocabularies aligned like mergekit 0.1.5 (which is run as the oracle)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from releaser.merge import run_merge
from releaser_testing import tiny_model

WORDS = ["hello", "world", "merge", "model", "token", "release", "weights", "stop"]


def make_tokenizer(folder: Path, extra: list[str]) -> int:
    """A tiny word-level fast tokenizer saved with transformers; returns its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": extra} if extra else {})
    fast.save_pretrained(folder)
    return len(fast.get_vocab())


@pytest.fixture()
def models(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    na = make_tokenizer(a, [])
    nb = make_tokenizer(b, ["<|im_start|>", "<|im_end|>"])
    tiny_model(a, seed=1, vocab=na, layers=2)
    tiny_model(b, seed=2, vocab=nb, layers=2)
    return a, b


def mergekit(cfg_path: Path, out: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    exe = Path(sys.executable).parent / "mergekit-yaml"
    proc = subprocess.run([str(exe), str(cfg_path), str(out), "--quiet"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("source", ["union", "base", "b"])
def test_vocab_alignment_matches_mergekit(models, tmp_path, source):
    a, b = models
    cfg = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": str(b) if source == "b" else source,
           "base_model": str(a),
           "models": [{"model": str(a), "parameters": {"weight": 0.4}}, {"model": str(b), "parameters": {"weight": 0.6}}]}
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    run_merge(path, tmp_path / "ours")
    mergekit(path, tmp_path / "theirs")
    ours, theirs = tensors(tmp_path / "ours"), tensors(tmp_path / "theirs")
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-7, msg=name)
    rows = ours["model.embed_tokens.weight"].shape[0]
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["vocab_size"] == rows
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "ours")
    assert len(tok.get_vocab()) == rows
    assert ("<|im_end|>" in tok.get_vocab()) == (source != "base")
