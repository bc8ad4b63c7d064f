"""mergekit's ``tokenizer:`` block (source, per-token sources with force, pad_to_multiple_of), with mergekit 0.1.5 as
the oracle (one subprocess for every config), and its bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_merge_vocab import make_tokenizer
from typer.testing import CliRunner

from releaser.cli import app
from releaser.merge import run_merge
from releaser_testing import tiny_model

runner = CliRunner()

SCRIPT = textwrap.dedent("""
    import json, sys
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    for out, cfg in json.load(open(sys.argv[1])):
        run_merge(MergeConfiguration.model_validate(cfg), out, MergeOptions(write_model_card=False, quiet=True))
""")


def configs(a: str, b: str) -> dict[str, dict]:
    models = [{"model": a, "parameters": {"weight": 0.4}}, {"model": b, "parameters": {"weight": 0.6}}]
    common = {"merge_method": "linear", "dtype": "float32", "base_model": a, "models": models}
    return {
        "union_tokens": {**common, "tokenizer": {"source": "union", "pad_to_multiple_of": 8, "tokens": {
            "<|im_end|>": {"source": b, "force": True},
            "hello": {"source": {"kind": "model_token", "model": b, "token": "world"}, "force": True},
            "<new>": {"source": {"kind": "model_token", "model": a, "token_id": 4}},
            "<zero>": {"source": {"kind": "zero"}},
            "<|im_start|>": {"source": {"kind": "zero"}},
        }}},
        "base_padded": {**common, "tokenizer": {"source": "base", "pad_to_multiple_of": 16}},
        "model_source": {**common, "tokenizer": {"source": b, "tokens": {
            "<s>": {"source": {"kind": "model_token", "model": a, "token": "stop"}, "force": True}}}},
        "slerp_union": {"merge_method": "slerp", "dtype": "float32", "base_model": b, "parameters": {"t": 0.3},
                        "models": [{"model": a}, {"model": b}], "tokenizer": {"source": "union"}},
    }


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokblock")
    a, b = root / "a", root / "b"
    a.mkdir()
    b.mkdir()
    tiny_model(a, seed=1, vocab=make_tokenizer(a, []), layers=2)
    tiny_model(b, seed=2, vocab=make_tokenizer(b, ["<|im_start|>", "<|im_end|>"]), layers=2)
    cfgs = configs(str(a), str(b))
    (root / "jobs.json").write_text(json.dumps([(str(root / "mk" / n), c) for n, c in cfgs.items()]))
    (root / "run.py").write_text(SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(root / "run.py"), str(root / "jobs.json")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name, cfg in cfgs.items():
        path = root / f"{name}.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        run_merge(path, root / "ours" / name)
    return root, cfgs, a, b


@pytest.mark.slow
@pytest.mark.parametrize("name", ["union_tokens", "base_padded", "model_source", "slerp_union"])
def test_tokenizer_block_matches_mergekit(merged, name):
    from transformers import AutoTokenizer

    root, _, _, _ = merged
    ours, theirs = root / "ours" / name, root / "mk" / name
    got, want = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=key)
    cfg_ours = json.loads((ours / "config.json").read_text())
    assert cfg_ours["vocab_size"] == json.loads((theirs / "config.json").read_text())["vocab_size"]
    assert cfg_ours["vocab_size"] == got["model.embed_tokens.weight"].shape[0]
    assert AutoTokenizer.from_pretrained(ours).get_vocab() == AutoTokenizer.from_pretrained(theirs).get_vocab()


def test_tokenizer_block_semantics(merged):
    root, _, a, b = merged
    from transformers import AutoTokenizer

    out = root / "ours" / "union_tokens"
    tok = AutoTokenizer.from_pretrained(out)
    vocab = tok.get_vocab()
    emb = load_file(out / "model.safetensors")["model.embed_tokens.weight"]
    assert emb.shape[0] % 8 == 0 and emb.shape[0] > len(vocab)
    assert {"<new>", "<zero>"} <= set(vocab)
    assert torch.count_nonzero(emb[vocab["<zero>"]]) == 0
    ea = load_file(a / "model.safetensors")["model.embed_tokens.weight"]
    eb = load_file(b / "model.safetensors")["model.embed_tokens.weight"]
    tb = AutoTokenizer.from_pretrained(b).get_vocab()
    # forced: both models' rows become b's "world" row, so the merge gives that row
    torch.testing.assert_close(emb[vocab["hello"]], eb[tb["world"]])
    torch.testing.assert_close(emb[vocab["<new>"]], ea[4])
    torch.testing.assert_close(emb[len(vocab):], emb[:len(vocab)].mean(0, keepdim=True).expand(emb.shape[0] - len(vocab), -1),
                               rtol=1e-5, atol=1e-6)


def cli_error(tmp_path, cfg) -> str:
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["merge", str(path), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code != 0
    text = result.output.strip()
    assert text.startswith("error:") and len(text.splitlines()) == 1 and "Traceback" not in text, text
    assert not (tmp_path / "out").exists()
    return text


def test_bad_token_sources(merged, tmp_path):
    root, cfgs, a, b = merged
    cfg = json.loads(json.dumps(cfgs["base_padded"]))
    cfg["tokenizer"]["tokens"] = {"<|im_end|>": {"source": str(a), "force": True}}
    assert "does not have the token '<|im_end|>'" in cli_error(tmp_path, cfg)
    cfg["tokenizer"]["tokens"] = {"x": {"source": str(tmp_path / "elsewhere")}}
    assert "is not one of the merged models" in cli_error(tmp_path, cfg)
    cfg["tokenizer"]["tokens"] = {"x": {"source": {"kind": "model_token", "model": str(a), "token": "nope"}}}
    assert "has no token 'nope'" in cli_error(tmp_path, cfg)
    cfg["tokenizer"]["tokens"] = {"x": {"source": {"kind": "model_token", "model": str(a), "token_id": 999}}}
    assert "out of range" in cli_error(tmp_path, cfg)
    cfg["tokenizer"]["tokens"] = {"x": {"source": {"kind": "model_token", "model": str(a)}}}
    assert "exactly one of `token` or `token_id`" in cli_error(tmp_path, cfg)
    cfg["tokenizer"]["tokens"] = {"x": {"source": {"kind": "embedding"}}}
    assert "tokenizer.tokens.x.source" in cli_error(tmp_path, cfg)
    cfg["tokenizer"] = {"source": "./somewhere/else"}
    assert "neither base, union nor a model folder" in cli_error(tmp_path, cfg)
    cfg["tokenizer"] = {"source": "union", "pad_to_multiple_of": 0}
    assert "pad_to_multiple_of" in cli_error(tmp_path, cfg)
    cfg["tokenizer"] = {"source": "union"}
    cfg["tokenizer_source"] = "union"
    assert "not both" in cli_error(tmp_path, cfg)


def test_vocab_mismatch_without_tokenizer_settings(merged, tmp_path):
    _, cfgs, _, _ = merged
    cfg = json.loads(json.dumps(cfgs["base_padded"]))
    del cfg["tokenizer"]
    text = cli_error(tmp_path, cfg)
    assert "shape mismatch for model.embed_tokens.weight" in text and "tokenizer_source" in text
