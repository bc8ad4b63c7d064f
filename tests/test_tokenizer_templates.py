"""Built-in chat templates: same text as the owners' published templates, stop test, bad template input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from releaser.cli import app
from releaser_testing import tiny_chat_model
from releaser.tokenizer.findings import has_errors
from releaser.tokenizer.fix import FixSpec, fix_tokenizer
from releaser.tokenizer.model import ModelFolder
from releaser.tokenizer.stoptest import stop_test
from releaser.tokenizer.templates import TemplateError, builtin_names, load_template, render_chat_template

PUBLISHED = json.loads((Path(__file__).parent / "data" / "tokenizer_published_templates.json").read_text())
NAMES = ["chatml", "llama2", "llama3", "mistral", "alpaca", "vicuna", "zephyr", "gemma", "phi3"]
NO_SYSTEM = {"mistral", "gemma"}
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi! What is 2+2?"},
    {"role": "assistant", "content": "  It is 4.  "},
    {"role": "user", "content": "And 3+3?"},
]


def _render(source: str, messages, gen: bool) -> str:
    return render_chat_template(source, messages, add_generation_prompt=gen, bos_token="<s>", eos_token="</s>")


def test_builtin_names():
    assert builtin_names() == NAMES
    assert set(PUBLISHED) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("gen", [True, False])
def test_builtin_renders_like_published(name, gen):
    messages = CONVERSATION[1:] if name in NO_SYSTEM else CONVERSATION
    if not gen:
        messages = messages + [{"role": "assistant", "content": "It is 6."}]
    ours = _render(load_template(name).source, messages, gen)
    theirs = _render(PUBLISHED[name]["chat_template"], messages, gen)
    assert ours == theirs
    assert "What is 2+2?" in ours and ("It is 6." in ours) != gen


def test_chatml_exact_text():
    text = _render(load_template("chatml").source, CONVERSATION[1:3], True)
    assert text == "<|im_start|>user\nHi! What is 2+2?<|im_end|>\n<|im_start|>assistant\n  It is 4.  <|im_end|>\n" \
                   "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("tiny") / "m")


@pytest.mark.parametrize("name", NAMES)
def test_builtin_passes_stop_test_after_fix(tiny, tmp_path, name):
    spec = load_template(name)
    report = fix_tokenizer(tiny, FixSpec(name, out_dir=tmp_path / name))
    assert not has_errors(report.remaining), report.remaining
    fixed = ModelFolder.open(tmp_path / name)
    tok = fixed.tokenizer
    assert tok.eos_token == (spec.eos or "</s>")
    assert tok.eos_token_id in fixed.generation_eos and fixed.config["eos_token_id"] == tok.eos_token_id
    assert tok.pad_token_id not in (None, tok.eos_token_id)
    for token in spec.tokens:
        tid = fixed.token_id(token)
        assert tid is not None and tok.added_tokens_decoder[tid].special
    result = stop_test(tok, tok.chat_template, fixed.generation_eos)
    assert result.passed, result.findings
    assert set(result.terminators) == {tok.eos_token_id}
    assert report.stop_strings[0] == tok.eos_token


def test_stop_test_catches_template_without_generation_prompt(tiny, tmp_path):
    fix_tokenizer(tiny, FixSpec("chatml", out_dir=tmp_path / "m"))
    tok = ModelFolder.open(tmp_path / "m").tokenizer
    broken = load_template("chatml").source.split("{% if add_generation_prompt %}")[0]
    codes = {f.code for f in stop_test(tok, broken, [tok.eos_token_id]).findings}
    assert codes == {"no-generation-prompt"}
    codes = {f.code for f in stop_test(tok, load_template("chatml").source, [2]).findings}
    assert codes == {"generation-eos"}


def test_unknown_template_lists_names(tiny, tmp_path):
    with pytest.raises(TemplateError) as err:
        load_template("chatlm")
    assert "chatlm" in str(err.value) and all(n in str(err.value) for n in NAMES)
    result = CliRunner().invoke(app, ["fix-tokenizer", str(tiny), "-t", "chatlm", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "error:" in result.output and "llama3" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


def test_template_file_syntax_error_names_line(tiny, tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for message in messages %}\n{{ message['content'] }}\n{% if x %}\n{{ y }\n{% endfor %}\n")
    with pytest.raises(TemplateError, match=r"bad\.jinja line 4: Jinja syntax error"):
        load_template(bad)
    result = CliRunner().invoke(app, ["doctor", str(tiny), "--template", str(bad)])
    assert result.exit_code == 2 and "line 4" in result.output


def test_user_template_file_with_metadata(tiny, tmp_path):
    (tmp_path / "mine.jinja").write_text(
        "{% for m in messages %}{{ '<|turn|>' + m['role'] + ': ' + m['content'] + '<|done|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|turn|>assistant: ' }}{% endif %}\n")
    (tmp_path / "mine.yaml").write_text("eos: '<|done|>'\ntokens: ['<|turn|>']\nstop: ['<|turn|>']\n")
    report = fix_tokenizer(tiny, FixSpec(tmp_path / "mine.jinja", out_dir=tmp_path / "out"))
    assert report.template == "mine" and report.eos_token == "<|done|>"
    assert report.added_tokens == ["<|turn|>", "<|done|>"] and not has_errors(report.remaining)
    assert report.stop_strings == ["<|done|>", "<|turn|>"] and len(report.eos_ids) == 3
