"""GGUF export bad input, atomic output, gguf-fix and the CLI commands (tiny models, no oracle needed except gguf-fix)."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from releaser.cli import app
from releaser.errors import ConfigError, ModelError, OutputError
from releaser.gguf import export_gguf
from releaser.gguf.convert import Converter
from releaser.gguf.fix import fix_gguf
from releaser_testing import tiny_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture
def model(tmp_path, smollm2):
    path = tiny_model(tmp_path / "model", "llama", layers=2, hidden=64, intermediate=128, vocab=49152)
    for f in TOKENIZER_FILES:
        shutil.copy(smollm2 / f, path / f)
    return path


def gguf_files(folder):
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_unsupported_architecture(model, tmp_path):
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="unsupported architecture GPT2LMHeadModel"):
        export_gguf(model, tmp_path / "out", ["F16"])
    assert gguf_files(tmp_path / "out") == []


@pytest.mark.parametrize("key, value, message", [
    ("num_hidden_layers", None, "has no num_hidden_layers"),
    ("num_attention_heads", 0, "num_attention_heads is 0, not a positive whole number"),
    ("hidden_size", 96, "says hidden_size 96 but model.embed_tokens.weight is 64 wide"),
])
def test_config_size_fields_checked_before_any_work(model, tmp_path, key, value, message):
    cfg = json.loads((model / "config.json").read_text())
    if value is None:
        del cfg[key]
    else:
        cfg[key] = value
    (model / "config.json").write_text(json.dumps(cfg))
    res = CliRunner().invoke(app, ["gguf", str(model), "-o", str(tmp_path / "out"), "--quant", "F16"])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and message in lines[0], res.output
    assert gguf_files(tmp_path / "out") == []


def test_unknown_pre_tokenizer_fails_before_writing(model, tmp_path):
    tok = json.loads((model / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "WhitespaceSplit"}, tok["pre_tokenizer"]]}
    (model / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ModelError, match=r"unknown BPE pre-tokenizer \(llama.cpp chkhsh [0-9a-f]{64}\)"):
        export_gguf(model, tmp_path / "out", ["F16"])
    assert gguf_files(tmp_path / "out") == []


def test_unknown_quant_lists_valid_names(model, tmp_path):
    with pytest.raises(ConfigError, match="unknown GGUF quant type Q4_K_X; valid types: F32, F16, .*Q4_K_M.*Q6_K"):
        export_gguf(model, tmp_path / "out", ["Q4_K_X"])


def test_output_not_writable(model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="not writable"):
        export_gguf(model, blocker / "out", ["F16"])


def test_output_folder_not_writable(model, tmp_path):
    """A folder the OS refuses to create (its parent is a file: this fails for root too, unlike permissions)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    with pytest.raises(OutputError, match="not writable"):
        export_gguf(model, blocker / "out", ["F16"])
    assert blocker.read_text() == "a file, not a folder"


def test_existing_file_needs_overwrite(model, tmp_path):
    export_gguf(model, tmp_path / "out", ["F16"], name="M")
    with pytest.raises(OutputError, match="already exists"):
        export_gguf(model, tmp_path / "out", ["F16"], name="M")
    export_gguf(model, tmp_path / "out", ["F16"], name="M", overwrite=True)
    assert gguf_files(tmp_path / "out") == ["M-F16.gguf"]


def test_failure_mid_write_leaves_nothing(model, tmp_path, monkeypatch):
    real = Converter.read

    def failing(self, plan):
        if plan.name.startswith("blk.1."):
            raise OSError("disk on fire")
        return real(self, plan)

    monkeypatch.setattr(Converter, "read", failing)
    with pytest.raises(OSError, match="disk on fire"):
        export_gguf(model, tmp_path / "out", ["F16", "Q8_0"], name="M")
    assert gguf_files(tmp_path / "out") == []


def test_cli_gguf_and_errors(model, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["gguf", str(model), "-o", str(tmp_path / "out"), "--quant", "f16,q8_0",
                              "--name", "Cli", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "Cli-F16.gguf" in res.output and "Cli-Q8_0.gguf" in res.output
    assert gguf_files(tmp_path / "out") == ["Cli-F16.gguf", "Cli-Q8_0.gguf"]
    res = runner.invoke(app, ["gguf", str(model), "-o", str(tmp_path / "x"), "--quant", "Q9_K"])
    assert res.exit_code != 0
    assert "error: unknown GGUF quant type Q9_K; valid types:" in " ".join(res.output.split())
    assert "Traceback" not in res.output


def test_gguf_fix_changes_metadata_only(model, tmp_path):
    import gguf_oracle as o   # skips without llama-cpp-python, fails in CI
    src = export_gguf(model, tmp_path / "out", ["Q8_0"], name="Fix").files["Q8_0"][0]
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<|im_start|>{{ m['content'] }}<|endoftext|>{% endfor %}")
    res = CliRunner().invoke(app, ["gguf-fix", str(src), "--chat-template", str(template), "--eos", "<|endoftext|>",
                                   "-o", str(tmp_path / "fixed.gguf")])
    assert res.exit_code == 0, res.output
    fixed = tmp_path / "fixed.gguf"
    assert o.tensors(fixed) == o.tensors(src)
    with o.load(fixed, vocab_only=True) as m:
        assert o.meta(m, "tokenizer.chat_template") == template.read_text()
        assert o.meta(m, "tokenizer.ggml.eos_token_id") == "0"
        assert o.meta(m, "general.name") == "Fix"
    with pytest.raises(ConfigError, match="not in the GGUF vocabulary"):
        fix_gguf(fixed, eos="<|no such token|>")
    assert fix_gguf(fixed, eos="<|endoftext|>").changes == {}


def test_missing_tokenizer(model, tmp_path):
    (model / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="has no tokenizer.json"):
        export_gguf(model, tmp_path / "out", ["F16"])
    assert gguf_files(tmp_path / "out") == []
