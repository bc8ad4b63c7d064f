"""The real SmolLM2-135M-Instruct tokenizer: clean under chatml; broken copies are detected, fixed, and stop again."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from releaser.cli import app
from releaser.tokenizer.doctor import diagnose
from releaser.tokenizer.fix import FixSpec, fix_tokenizer

pytestmark = pytest.mark.slow
MAX_NEW = 12
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2))


def _broken_copy(smollm2, dst, case):
    """Copy the small files; link the weights (never written: these fixes change no rows)."""
    dst.mkdir()
    for f in smollm2.iterdir():
        if f.suffix == ".safetensors":
            (dst / f.name).symlink_to(f)
        else:
            shutil.copy(f, dst / f.name)
    if case == "eos_endoftext":
        _edit_json(dst / "tokenizer_config.json", eos_token="<|endoftext|>")
        _edit_json(dst / "config.json", eos_token_id=0)
        _edit_json(dst / "generation_config.json", eos_token_id=0)
    elif case == "no_template":
        (dst / "chat_template.jinja").unlink()
    elif case == "generation_without_eos":
        _edit_json(dst / "generation_config.json", eos_token_id=None)
    return dst


@pytest.fixture(scope="module")
def model(smollm2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()


def _generate(model, folder):
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(folder)
    config = GenerationConfig.from_pretrained(folder)
    config.update(max_new_tokens=MAX_NEW, do_sample=False)
    enc = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, generation_config=config)
    return tok, out[0, enc["input_ids"].shape[1]:].tolist()


def test_real_smollm2_is_clean_under_chatml(smollm2, tmp_path):
    report = diagnose(smollm2, "chatml")
    assert report.clean and report.end_of_turn == ["<|im_end|>"]
    assert {f.code for f in report.findings} == {"pad-is-eos", "template-differs"}     # warnings only
    result = CliRunner().invoke(app, ["doctor", str(smollm2), "--template", "chatml"])
    assert result.exit_code == 0 and "clean" in result.output


@pytest.mark.parametrize("case, expected", [
    ("eos_endoftext", {"eos-mismatch", "config-eos", "generation-eos"}),
    ("no_template", {"no-template"}),
    ("pad_eos", {"pad-is-eos"}),
    ("generation_without_eos", {"generation-eos"}),
])
def test_broken_copy_detected_fixed_and_stops(smollm2, model, tmp_path, case, expected):
    broken = _broken_copy(smollm2, tmp_path / "broken", case)
    codes = {f.code for f in diagnose(broken, "chatml").findings}
    assert expected <= codes
    if case == "eos_endoftext":
        _, ids = _generate(model, broken)
        assert len(ids) == MAX_NEW            # does not stop at the end of the turn
    report = fix_tokenizer(broken, FixSpec("chatml", in_place=True))
    assert report.remaining == [] and report.eos_token == "<|im_end|>" and report.pad_token == "<|endoftext|>"
    assert (broken / "model.safetensors").is_symlink()   # weights untouched: only changed files are written
    tok, ids = _generate(model, broken)
    assert len(ids) < MAX_NEW and ids[-1] == tok.eos_token_id == 2, tok.decode(ids)
    assert "Paris" in tok.decode(ids)


def test_zeroed_im_end_row_detected_and_repaired(smollm2, tmp_path):
    broken = tmp_path / "zero"
    shutil.copytree(smollm2, broken)
    state = load_file(broken / "model.safetensors")
    embed = state["model.embed_tokens.weight"]
    embed[2] = 0                                          # tied: this is lm_head's row too
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    finding = next(f for f in diagnose(broken, "chatml").findings if f.code == "untrained-rows")
    assert "'<|im_end|>' (2)" in finding.evidence and finding.severity == "error"
    report = fix_tokenizer(broken, FixSpec("chatml", out_dir=tmp_path / "fixed"))
    assert report.repaired_rows == [2] and report.remaining == []
    fixed = load_file(tmp_path / "fixed" / "model.safetensors")
    assert "lm_head.weight" not in fixed
    assert torch.allclose(fixed["model.embed_tokens.weight"][2], torch.cat([embed[:2], embed[3:]]).mean(0))
