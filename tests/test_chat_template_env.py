"""Issue 18 item 14 (and 9): model-supplied chat templates are compiled and rendered in one place, transformers' own
chat-template environment, by every command: a valid template with loop controls is accepted everywhere, a sandbox
escape is refused everywhere (gguf-fix included), and no other module builds its own Jinja environment for them."""

from __future__ import annotations

import re
from pathlib import Path

import jinja2
import pytest
from safety_helpers import one_line_error, run as cli

import releaser
from releaser.card.prompt import jinja_renderer
from releaser.gguf.reader import open_gguf
from releaser_testing import tiny_chat_model, tiny_gguf
from releaser.tokenizer.fix import FixSpec, fix_tokenizer
from releaser.tokenizer.templates import TemplateError, check_renders, check_syntax, load_template

# Valid in transformers (it enables jinja2.ext.loopcontrols): system turns are skipped with {% continue %}, and
# rendering stops at a turn with {% break %}.
LOOP_CONTROLS = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
    "{% if m['content'] == 'STOP' %}{% break %}{% endif %}"
    "{{ '<|turn|>' + m['role'] + ': ' + m['content'] + '<|done|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn|>assistant: ' }}{% endif %}")
ESCAPE = "{{ messages.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
MESSAGES = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]


def test_loop_controls_pass_the_syntax_check(tmp_path):
    check_syntax(LOOP_CONTROLS, "t")
    (tmp_path / "loops.jinja").write_text(LOOP_CONTROLS)
    assert load_template(tmp_path / "loops.jinja").source == LOOP_CONTROLS
    assert check_renders(LOOP_CONTROLS, "t") == ("<|turn|>user: What is two plus two?<|done|><|turn|>assistant: Two "
                                                 "plus two is four.<|done|><|turn|>user: And three plus three?<|done|>"
                                                 "<|turn|>assistant: Three plus three is six.<|done|>")


def test_gguf_card_renderer_accepts_loop_controls_like_transformers(tmp_path):
    from transformers import AutoTokenizer

    from releaser_testing import tiny_tokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer(tmp_path, chat_template=LOOP_CONTROLS))
    render = jinja_renderer(LOOP_CONTROLS, "<s>", "</s>")
    for messages in (MESSAGES, MESSAGES + [{"role": "user", "content": "STOP"}, {"role": "user", "content": "X"}]):
        expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render(messages) == expected == "<|turn|>user: U<|done|><|turn|>assistant: "


def test_fix_tokenizer_accepts_loop_controls(tmp_path):
    model = tiny_chat_model(tmp_path / "m")
    (tmp_path / "loops.jinja").write_text(LOOP_CONTROLS)
    (tmp_path / "loops.yaml").write_text("eos: '<|done|>'\ntokens: ['<|turn|>']\n")
    report = fix_tokenizer(model, FixSpec(tmp_path / "loops.jinja", out_dir=tmp_path / "out"))
    assert report.template == "loops" and report.eos_token == "<|done|>"


def test_gguf_fix_accepts_loop_controls(tmp_path):
    path = tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "loops.jinja").write_text(LOOP_CONTROLS)
    code, output = cli("gguf-fix", path, "--chat-template", tmp_path / "loops.jinja")
    assert code == 0, output
    assert open_gguf(path).fields["tokenizer.chat_template"].contents() == LOOP_CONTROLS


def test_sandbox_escape_is_refused_by_the_shared_check():
    with pytest.raises(TemplateError, match=r"SecurityError"):
        check_renders(ESCAPE, "the chat template")
    with pytest.raises(jinja2.exceptions.SecurityError):
        jinja_renderer(ESCAPE, "", "")(MESSAGES)


def test_gguf_fix_refuses_a_sandbox_escape_before_writing(tmp_path):
    path = tiny_gguf(tmp_path / "tiny.gguf")
    before = path.read_bytes()
    (tmp_path / "escape.jinja").write_text(ESCAPE)
    code, output = cli("gguf-fix", path, "--chat-template", tmp_path / "escape.jinja", "--name", "X")
    line = one_line_error(output)
    assert code == 2 and "chat template" in line and "SecurityError" in line and "fix the template" in line
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["escape.jinja", "tiny.gguf"]


def test_gguf_fix_refuses_a_template_that_raises(tmp_path):
    path = tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "raises.jinja").write_text("{{ raise_exception('only system turns') }}")
    code, output = cli("gguf-fix", path, "--chat-template", tmp_path / "raises.jinja")
    assert code == 2 and "only system turns" in one_line_error(output)


def test_gguf_fix_template_sees_the_new_eos(tmp_path):
    path = tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "eos.jinja").write_text("{% if eos_token != '<|im_start|>' %}{{ raise_exception('eos is ' + "
                                        "eos_token) }}{% endif %}{% for m in messages %}{{ m['content'] + eos_token }}"
                                        "{% endfor %}")
    assert cli("gguf-fix", path, "--chat-template", tmp_path / "eos.jinja", "--eos", "<|im_start|>")[0] == 0
    code, output = cli("gguf-fix", path, "--chat-template", tmp_path / "eos.jinja", "--eos", "<|im_end|>")
    assert code == 2 and "eos is <|im_end|>" in one_line_error(output)


# Modules allowed to build a Jinja environment: the card renderer (releaser's own card templates, not
# model-supplied) and the one function every model-supplied chat template goes through.
OWN_ENVIRONMENTS = {"card/render.py", "tokenizer/templates.py"}
JINJA_SETUP = re.compile(r"\bEnvironment\(|SandboxedEnvironment|from_string\(|jinja2\.Template\(|\.parse\(|"
                         r"_compile_jinja_template|render_jinja_template")


def test_one_place_compiles_model_supplied_templates():
    root = Path(releaser.__file__).parent
    offenders = [f"{p.relative_to(root).as_posix()}:{n}" for p in sorted(root.rglob("*.py"))
                 if p.relative_to(root).as_posix() not in OWN_ENVIRONMENTS
                 for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                 if JINJA_SETUP.search(line)]
    assert offenders == [], "compile chat templates with releaser.tokenizer.templates.compile_chat_template"
