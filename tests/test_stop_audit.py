"""The stop audit (issue 23, item 4): answers sampled from the model through its chat template, the token that ends
each, checked against every artefact's and runtime file's stops; a model that does not stop fails with its figure.

The model under test is a tiny Llama with SmolLM2's tokenizer (ChatML, eos ``<|im_end|>``), fine-tuned for a few
steps (as the demo's LoRA was trained) to end its turns with ``<|endoftext|>``: the fine-tune whose template says one
end token while the model emits another."""

from __future__ import annotations

import json

import pytest

from releaser.errors import GateError
from releaser.tokenizer import verify
from releaser.tokenizer.audit import builtin_prompts, stop_audit
from releaser.tokenizer.options import StopAuditOptions, TokenizerOptions
from releaser.tokenizer.stage import run as fix_run
from releaser_testing import tiny_model, turn_ending_model

FIX = "tokenizer: {eos: [<|im_end|>, <|endoftext|>]}"


@pytest.fixture(scope="module")
def eot_model(tmp_path_factory, smollm2):
    return turn_ending_model(tmp_path_factory.mktemp("audit") / "eot", smollm2, end="<|endoftext|>")


@pytest.fixture(scope="module")
def fixed(eot_model, tmp_path_factory):
    """The same model with <|endoftext|> declared a stop through the recipe's tokenizer section."""
    out = tmp_path_factory.mktemp("fixed") / "main"
    fix_run(TokenizerOptions(template="chatml", eos=["<|im_end|>", "<|endoftext|>"]), eot_model, out)
    return out


def test_builtin_prompts_are_sixteen():
    prompts = builtin_prompts()
    assert len(prompts) == 16 and len(set(prompts)) == 16


def test_audit_names_an_undeclared_end_token_and_the_fix(eot_model):
    result = stop_audit(eot_model)
    assert result.answers == 16 and result.ended >= 14, result.to_dict()
    assert result.counts.get("<|endoftext|>", 0) >= 14 and result.declared == [2]
    [problem] = result.problems()
    assert "'<|endoftext|>' (id 0)" in problem and "does not declare a stop" in problem and FIX in problem
    with pytest.raises(GateError, match="fails the stop audit") as err:
        verify.run(TokenizerOptions(template="chatml"), eot_model, audit=StopAuditOptions())
    assert FIX in str(err.value)


def test_audit_is_seeded(eot_model):
    a, b = stop_audit(eot_model), stop_audit(eot_model)
    assert a.endings == b.endings and a.lengths == b.lengths
    c = stop_audit(eot_model, StopAuditOptions(seed=1))
    assert c.lengths != a.lengths


def test_declaring_the_token_passes(fixed):
    gen = json.loads((fixed / "generation_config.json").read_text())
    assert gen["eos_token_id"][0] == 2 and 0 in gen["eos_token_id"]
    result = verify.run(TokenizerOptions(template="chatml", eos=["<|im_end|>", "<|endoftext|>"]), fixed,
                        audit=StopAuditOptions())
    audit = result.facts["stop_audit"]
    assert audit["share_ended"] >= 0.875 and audit["endings"] == {"<|endoftext|>": 0}
    assert "answers end (<|endoftext|>" in result.summary


def test_a_model_that_does_not_stop_fails_with_its_share(smollm2, tmp_path):
    """A random model: its end tokens are a few of 49152, so almost no answer ends within 64 tokens."""
    model = tiny_model(tmp_path / "random", "llama", layers=1, hidden=64, intermediate=128, heads=2, kv_heads=1,
                       vocab=49152)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        (model / name).write_bytes((smollm2 / name).read_bytes())
    result = stop_audit(model, StopAuditOptions(max_tokens=64))
    assert result.share_ended < 0.5 and all(n <= 64 for n in result.lengths)
    problem = result.problems()[-1]
    assert f"only {result.ended} of 16 sampled answers ({result.share_ended:.0%}) end within 64 tokens" in problem
    with pytest.raises(GateError, match=r"the model does not stop"):
        verify.run(None, model, audit=StopAuditOptions(max_tokens=64))


def test_unknown_stop_token_is_one_line(eot_model, tmp_path):
    from releaser.errors import ConfigError

    with pytest.raises(ConfigError, match=r"tokenizer.eos: '<\|nope\|>' is not a token of the vocabulary"):
        fix_run(TokenizerOptions(template="chatml", eos=["<|im_end|>", "<|nope|>"]), eot_model, tmp_path / "out")
    with pytest.raises(ValueError, match="listed twice"):
        TokenizerOptions(template="chatml", eos=["<|im_end|>", "<|im_end|>"])


def _recipe(path, model, eos: str) -> object:
    path.write_text(f"name: me/Tiny-Chat\ndescription: A tiny chat fine-tune.\nmodel: {model}\n"
                    f"tokenizer: {{template: chatml, eos: {eos}}}\ngguf: {{quants: [Q8_0]}}\nquality: false\n")
    return path


def test_release_fails_at_verify_then_every_artefact_stops_once_declared(eot_model, tmp_path):
    """The release stops at verify with the fix; with it every artefact and runtime file stops on <|endoftext|>, and
    the gate checks each of them against the audit's ending tokens."""
    from releaser.gguf.reader import GGUFFile
    from releaser.gguf.stops import llama_eog_ids
    from releaser.pipeline import run_release
    from releaser.pipeline.gate import check_release
    from releaser.pipeline.run import open_release

    work = tmp_path / "work"
    with pytest.raises(GateError) as err:
        run_release(_recipe(tmp_path / "r.yaml", eot_model, "'<|im_end|>'"), work)
    assert "'<|endoftext|>' (id 0)" in str(err.value) and FIX in str(err.value)
    recipe = _recipe(tmp_path / "r.yaml", eot_model, "['<|im_end|>', '<|endoftext|>']")
    run_release(recipe, work)
    facts = json.loads((work / "release.json").read_text())["stages"]["verify"]["facts"]["stop_audit"]
    assert facts["endings"] == {"<|endoftext|>": 0} and facts["share_ended"] >= 0.875
    gguf_dir = work / "Tiny-Chat-GGUF"
    [path] = gguf_dir.glob("*.gguf")
    values = GGUFFile(path).values
    special = {k: values.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")}
    assert 0 in llama_eog_ids(values["tokenizer.ggml.tokens"], special)
    params = gguf_dir / "params"
    assert json.loads(params.read_text())["stop"] == ["<|im_end|>", "<|endoftext|>"]
    assert "<|endoftext|>" in (gguf_dir / "model.yaml").read_text()
    # a runtime file that lost the stop: the gate names it and the fix (besides the changed file itself)
    params.write_text(json.dumps({"stop": ["<|im_end|>"]}))
    with pytest.raises(GateError) as err:
        check_release(open_release(recipe, work))
    assert "Tiny-Chat-GGUF/params (Ollama) does not stop on '<|endoftext|>'" in str(err.value)
    assert FIX in str(err.value)
