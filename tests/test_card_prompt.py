"""Prompt-format facts: sample rendering, Ollama TEMPLATE translation, sandboxed rendering of GGUF chat templates."""

from __future__ import annotations

import jinja2
import pytest

from releaser.card.prompt import jinja_renderer, ollama_template, prompt_facts, sample_prompt
from releaser_testing import CHATML_TEMPLATE, tiny_tokenizer

MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
           "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
DEFAULT_SYSTEM = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                  "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
                  "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_chatml_ollama_template_has_an_optional_system_block():
    render = jinja_renderer(CHATML_TEMPLATE, "<|im_start|>", "<|im_end|>")
    assert sample_prompt(render) == ("<|im_start|>system\n{system_prompt}<|im_end|>\n<|im_start|>user\n{prompt}"
                                     "<|im_end|>\n<|im_start|>assistant\n")
    assert ollama_template(render, "<|im_end|>", None) == (
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}<|im_start|>user\n{{ .Prompt }}"
        "<|im_end|>\n<|im_start|>assistant\n{{ .Response }}<|im_end|>")


def test_default_system_prompt_goes_to_the_else_branch():
    render = jinja_renderer(DEFAULT_SYSTEM, "", "<|im_end|>")
    assert ollama_template(render, "<|im_end|>", None) == (
        "{{ if .System }}<|im_start|>system\n{{ .System }}{{ else }}<|im_start|>system\nYou are helpful.{{ end }}"
        "<|im_end|>\n<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n{{ .Response }}<|im_end|>")


def test_template_without_system_role_and_bos_stripped():
    render = jinja_renderer(MISTRAL, "<s>", "</s>")
    assert sample_prompt(render) == "<s>[INST] {prompt} [/INST]"
    assert ollama_template(render, "</s>", "<s>") == "[INST] {{ .Prompt }} [/INST]{{ .Response }}</s>"
    facts = prompt_facts(render, ["</s>", "</s>", ""], "<s>")
    assert facts.stop_tokens == ["</s>"]


def test_no_chat_template_keeps_stop_tokens():
    facts = prompt_facts(None, ["<|endoftext|>"], None)
    assert (facts.sample, facts.ollama_template, facts.stop_tokens) == (None, None, ["<|endoftext|>"])


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, DEFAULT_SYSTEM])
def test_sandboxed_renderer_matches_transformers(tmp_path, template):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer(tmp_path, chat_template=template))
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    ours = jinja_renderer(template, tok.bos_token, tok.eos_token)(messages)
    assert ours == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_model_supplied_template_runs_in_a_sandbox():
    render = jinja_renderer("{{ messages.__class__.__mro__[1].__subclasses__() }}", "", "")
    with pytest.raises(jinja2.exceptions.SecurityError):
        render([{"role": "user", "content": "x"}])
