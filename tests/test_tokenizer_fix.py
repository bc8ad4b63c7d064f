"""fix-tokenizer on a tiny Mistral-style model: chat tokens, resizing, eos/pad/BOS, rows, output modes, errors."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from releaser.cli import app
from releaser.errors import ConfigError, ModelError, OutputError
from releaser_testing import tiny_chat_model
from releaser.tokenizer.doctor import diagnose
from releaser.tokenizer.fix import FixSpec, fix_tokenizer
from releaser.tokenizer.model import ModelFolder
from releaser.tokenizer.stoptest import CONVERSATION
from releaser.tokenizer.templates import load_template

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture
def tiny(tiny_src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_src, dst)
    return dst


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _json(path):
    return json.loads(path.read_text())


def test_mistral_style_switched_to_chatml(tiny, tmp_path):
    before = _digest(tiny)
    result = runner.invoke(app, ["doctor", str(tiny), "--template", "chatml", "--json"])
    assert result.exit_code == 1
    codes = {f["code"] for f in json.loads(result.output)["findings"]}
    assert {"no-template", "token-missing", "eos-mismatch", "pad-missing"} <= codes

    out = tmp_path / "out"
    result = runner.invoke(app, ["fix-tokenizer", str(tiny), "-t", "chatml", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "eos_token: '</s>' -> '<|im_end|>'" in result.output and "rows 200 -> 202" in result.output
    assert _digest(tiny) == before                              # the input is never modified

    added = {t["content"]: t for t in _json(out / "tokenizer.json")["added_tokens"]}
    assert added["<|im_start|>"]["id"] == 200 and added["<|im_end|>"]["id"] == 201
    assert all(added[t]["special"] and not added[t]["normalized"] for t in ("<|im_start|>", "<|im_end|>"))
    assert _json(out / "tokenizer_config.json")["eos_token"] == "<|im_end|>"
    config = _json(out / "config.json")
    assert config["eos_token_id"] == 201 and config["vocab_size"] == 202
    assert _json(out / "generation_config.json")["eos_token_id"] == [201, 2]

    old, new = load_file(tiny / "model.safetensors"), load_file(out / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert new[name].shape == (202, 64)
        assert torch.equal(new[name][:200], old[name])
        assert torch.allclose(new[name][200], old[name].mean(0)) and torch.equal(new[name][201], new[name][200])
    assert set(new) == set(old)

    fixed = ModelFolder.open(out)
    enc = fixed.tokenizer.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True, return_dict=True)
    ids = enc["input_ids"]
    assert ids[0] == 200 and 201 in ids
    assert runner.invoke(app, ["doctor", str(out), "--template", "chatml"]).exit_code == 0


def test_tied_embeddings_stay_tied(tmp_path):
    src = tiny_chat_model(tmp_path / "tied", tied=True)
    fix_tokenizer(src, FixSpec("llama3", out_dir=tmp_path / "out"))
    state = load_file(tmp_path / "out" / "model.safetensors")
    assert "lm_head.weight" not in state and state["model.embed_tokens.weight"].shape[0] == 203
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.lm_head.weight.shape[0] == 203


def test_in_place_writes_only_changed_files(tiny):
    weights = (tiny / "model.safetensors").stat()
    report = fix_tokenizer(tiny, FixSpec("zephyr", in_place=True))
    assert set(report.changes) == {"tokenizer_config.json", "chat_template.jinja", "config.json",
                                   "generation_config.json"}
    after = (tiny / "model.safetensors").stat()
    assert (after.st_ino, after.st_mtime_ns) == (weights.st_ino, weights.st_mtime_ns)
    assert not [p for p in tiny.iterdir() if p.name.startswith(".")]
    again = fix_tokenizer(tiny, FixSpec("zephyr", in_place=True))
    assert again.changes == {} and not again.remaining


def test_double_bos_removed(tiny, tmp_path):
    assert "double-bos" in {f.code for f in diagnose(tiny, "mistral").findings}
    report = fix_tokenizer(tiny, FixSpec("mistral", out_dir=tmp_path / "out"))
    assert "post_processor: no longer adds BOS (the template writes it)" in report.changes["tokenizer.json"]
    tok = ModelFolder.open(tmp_path / "out").tokenizer
    text = tok.apply_chat_template(CONVERSATION[:2], tokenize=False)
    ids = tok(text)["input_ids"]
    assert text.startswith("<s>[INST]") and ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert tok("plain text")["input_ids"][0] != tok.bos_token_id


def test_untrained_rows_repaired(tiny, tmp_path):
    state = load_file(tiny / "model.safetensors")
    state["model.embed_tokens.weight"][2] = 0          # </s>, which the template writes
    state["lm_head.weight"][2] = 0
    save_file(state, tiny / "model.safetensors")
    (tiny / ".git").mkdir()
    (tiny / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tiny / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    finding = next(f for f in diagnose(tiny, "llama2").findings if f.code == "untrained-rows")
    assert "'</s>' (2)" in finding.evidence
    report = fix_tokenizer(tiny, FixSpec("llama2", in_place=True))
    assert report.repaired_rows == [2] and report.resized is None
    new = load_file(tiny / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        others = torch.cat([state[name][:2], state[name][3:]])
        assert torch.allclose(new[name][2], others.mean(0))
    assert "untrained-rows" not in {f.code for f in report.remaining}
    assert (tiny / ".git" / "HEAD").is_file() and (tiny / ".gitattributes").is_file()   # in place: untouched
    assert not [p for p in tiny.parent.iterdir() if "releaser-" in p.name]
    fix_tokenizer(tiny, FixSpec("chatml", out_dir=tmp_path / "copy"))
    assert (tmp_path / "copy" / ".gitattributes").is_file() and not (tmp_path / "copy" / ".git").exists()


def test_system_prompt(tiny, tmp_path):
    report = fix_tokenizer(tiny, FixSpec("chatml", out_dir=tmp_path / "out", system_prompt='Be "brief".\nAlways.'))
    assert not report.remaining
    tok = ModelFolder.open(tmp_path / "out").tokenizer
    text = tok.apply_chat_template(CONVERSATION[:1], tokenize=False)
    assert text.startswith('<|im_start|>system\nBe "brief".\nAlways.<|im_end|>\n<|im_start|>user\n')
    own = [{"role": "system", "content": "Mine."}, *CONVERSATION[:1]]
    assert tok.apply_chat_template(own, tokenize=False).count("system") == 1
    with pytest.raises(ConfigError, match="gemma has no system role"):
        fix_tokenizer(tiny, FixSpec("gemma", out_dir=tmp_path / "g", system_prompt="Hi"))


def test_custom_eos(tiny, tmp_path):
    legacy = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}, "unk_token": "<unk>"}
    (tiny / "special_tokens_map.json").write_text(json.dumps(legacy))
    with pytest.raises(ConfigError, match="alpaca template does not define it"):  # a new, untrained eos: a typo?
        fix_tokenizer(tiny, FixSpec("alpaca", out_dir=tmp_path / "out", eos="<|end_of_answer|>"))
    assert not (tmp_path / "out").exists()
    template = tmp_path / "answer.jinja"   # a template that defines its end-of-turn token may add it
    shutil.copy(load_template("alpaca").path, template)
    template.with_suffix(".yaml").write_text("eos: <|end_of_answer|>\n")
    report = fix_tokenizer(tiny, FixSpec(str(template), out_dir=tmp_path / "out", eos="<|end_of_answer|>"))
    assert report.eos_token == "<|end_of_answer|>" and report.added_tokens == ["<|end_of_answer|>"]
    assert report.eos_ids == [200, 2] and not [f for f in report.remaining if f.severity == "error"]
    legacy = _json(tmp_path / "out" / "special_tokens_map.json")
    assert legacy["eos_token"] == {"content": "<|end_of_answer|>", "special": True} and legacy["pad_token"] == "<unk>"


def test_bad_inputs(tiny, tmp_path):
    with pytest.raises(ConfigError, match="'not a token' is not in the vocabulary and the chatml template does not"):
        fix_tokenizer(tiny, FixSpec("chatml", out_dir=tmp_path / "o", eos="not a token"))
    result = runner.invoke(app, ["fix-tokenizer", str(tiny), "-t", "chatml", "-o", str(tmp_path / "o"),
                                 "--eos", "not a token"])
    assert result.exit_code == 2 and "error:" in result.output and "--eos" in result.output

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny / "config.json", bare)
    shutil.copy(tiny / "model.safetensors", bare)
    with pytest.raises(ModelError, match="has no tokenizer"):
        diagnose(bare)
    for args in (["doctor", str(bare)], ["fix-tokenizer", str(bare), "-t", "chatml", "--in-place"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "has no tokenizer" in result.output and "Traceback" not in result.output

    with pytest.raises(OutputError, match="choose where to write"):
        fix_tokenizer(tiny, FixSpec("chatml"))
    with pytest.raises(OutputError, match="choose where to write"):
        fix_tokenizer(tiny, FixSpec("chatml", out_dir=tmp_path / "o", in_place=True))
    with pytest.raises(OutputError, match="use --in-place"):
        fix_tokenizer(tiny, FixSpec("chatml", out_dir=tiny))
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        fix_tokenizer(tiny, FixSpec("chatml", out_dir=tmp_path / "exists"))
    assert not list(tmp_path.glob(".*releaser-tmp"))


def test_control_tokens_marked_special(tiny, tmp_path):
    fix_tokenizer(tiny, FixSpec("chatml", in_place=True))
    data = _json(tiny / "tokenizer.json")
    for t in data["added_tokens"]:
        if t["content"] == "<|im_end|>":
            t.update(special=False, normalized=True)
    (tiny / "tokenizer.json").write_text(json.dumps(data))
    codes = {f.code for f in diagnose(tiny).findings}          # the model's own template, no --template
    assert "token-not-special" in codes
    report = fix_tokenizer(tiny, FixSpec("chatml", in_place=True))
    assert report.changes["tokenizer.json"] == ["'<|im_end|>': special False -> True, normalized True -> False"]
    assert not report.remaining


def test_tokenizer_only_folder(tiny, tmp_path):
    (tiny / "model.safetensors").unlink()
    report = fix_tokenizer(tiny, FixSpec("zephyr", out_dir=tmp_path / "out"))
    assert not [f for f in report.remaining if f.severity == "error"]
    with pytest.raises(ModelError, match="has no weights"):
        fix_tokenizer(tiny, FixSpec("chatml", out_dir=tmp_path / "out2"))


def test_sharded_model_resized_in_place(tmp_path):
    src = tiny_chat_model(tmp_path / "sharded", shard_bytes=60_000)
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) > 2
    report = fix_tokenizer(src, FixSpec("chatml", in_place=True))
    assert report.resized == (200, 202) and not report.remaining
    index = _json(src / "model.safetensors.index.json")
    assert set(index["weight_map"].values()) == {p.name for p in src.glob("*.safetensors")}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    assert model.get_input_embeddings().weight.shape[0] == 202


def test_eos_repeated_on_the_command_line_declares_every_stop(tiny, tmp_path):
    """``--eos A --eos B``: A ends turns (the tokenizer's eos), and both end generation in generation_config.json,
    as the recipe's ``tokenizer: {eos: [A, B]}`` does."""
    out = tmp_path / "out"
    result = runner.invoke(app, ["fix-tokenizer", str(tiny), "-t", "chatml", "--eos", "<|im_end|>", "--eos", "<unk>",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert _json(out / "tokenizer_config.json")["eos_token"] == "<|im_end|>"
    assert _json(out / "generation_config.json")["eos_token_id"] == [201, 0, 2]   # and the old eos, as without
    result = runner.invoke(app, ["fix-tokenizer", str(tiny), "-t", "chatml", "--eos", "<|im_end|>", "--eos",
                                 "<|im_end|>", "-o", str(tmp_path / "twice")])
    assert result.exit_code == 2 and "listed twice" in result.output and not (tmp_path / "twice").exists()
