"""One config.json reader (releaser.checkpoint.config.read_config) and one tokenizer loader
(releaser.tokenizer.model.load_tokenizer) behind every command that reads a model folder: a missing or broken
config.json or tokenizer gives one line naming it, never a traceback."""

from __future__ import annotations

import shutil

import pytest
from safety_helpers import model, one_line_error, run  # noqa: F401 - model is a fixture

from releaser.checkpoint import read_config
from releaser.errors import ModelError

BROKEN = {"missing": (None, "has no config.json"), "not JSON": ("{'hidden_size': 64", "is not valid JSON"),
          "a list": ("[1, 2]", "does not hold a JSON object")}


def _commands(folder, tmp_path):
    return {"doctor": ["doctor", folder], "gguf": ["gguf", folder, "-o", tmp_path / "g", "-Q", "F32"],
            "awq": ["awq", folder, "-o", tmp_path / "a"], "card": ["card", folder],
            "fix-tokenizer": ["fix-tokenizer", folder, "-t", "chatml", "-o", tmp_path / "f"]}


@pytest.mark.parametrize("case", list(BROKEN))
def test_every_command_names_a_broken_config(model, tmp_path, case):
    text, words = BROKEN[case]
    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    if text is None:
        (folder / "config.json").unlink()
    else:
        (folder / "config.json").write_text(text)
    with pytest.raises(ModelError, match=words):
        read_config(folder)
    for name, args in _commands(folder, tmp_path).items():
        code, output = run(*args)
        if name == "doctor" and code == 0:
            continue   # doctor checks the tokenizer; it only leaves out the family line
        line = one_line_error(output)
        want = "has neither config.json nor .gguf files" if name == "card" and text is None else words  # or GGUFs
        assert code != 0 and want in line and "config.json" in line, (name, line)


def test_one_tokenizer_loader():
    """Every stage loads tokenizers through releaser.tokenizer.model.load_tokenizer (local files, no remote code, one
    line for a missing or broken tokenizer): no other module calls AutoTokenizer.from_pretrained."""
    from pathlib import Path

    import releaser

    root = Path(releaser.__file__).parent
    callers = [p.relative_to(root).as_posix() for p in root.rglob("*.py")
               if "AutoTokenizer.from_pretrained" in p.read_text(encoding="utf-8")]
    assert callers == ["tokenizer/model.py"]


@pytest.mark.parametrize("command", ["gguf", "awq"])
def test_a_broken_tokenizer_is_one_line_in_every_stage(model, tmp_path, command):
    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    (folder / "tokenizer.json").write_text("{not json")
    code, output = run(command, folder, "-o", tmp_path / "out")
    line = one_line_error(output)
    assert code == 2 and "cannot load the tokenizer in" in line and str(folder) in line, line
