"""Non-finite figures never pass: ``releaser eval`` on a model or artefact whose logits are NaN or infinite fails
with one line (it used to report PPL NaN and KLD 0, pass the gate, exit 0 and write a bare NaN into the JSON)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from safety_helpers import one_line_error as _one_line
from typer.testing import CliRunner

from releaser.cli import app
from releaser_testing import rtn_awq, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("finite")
    model = tiny_tokenizer(tiny_model(root / "model", seed=3))
    return model, rtn_awq(model, root / "model-AWQ")


def _nan_tensor(folder, part: str) -> None:
    """Every value of the first tensor whose name contains ``part`` becomes NaN."""
    weights = next(folder.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(n for n in tensors if part in n)
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, weights, metadata={"format": "pt"})


def _eval(model, artefact, out) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["eval", str(model), str(artefact), "-o", str(out), "--ctx", "32", "--chunks", "2",
                                   "-q"])
    return res.exit_code, res.output


def test_the_healthy_pair_passes(tiny, tmp_path):
    code, out = _eval(*tiny, tmp_path / "q.json")
    assert code == 0, out
    assert json.loads((tmp_path / "q.json").read_text())["gate"]["passed"] is True


def test_nan_in_the_unquantized_model(tiny, tmp_path):
    model, gguf = tiny
    broken = tmp_path / "model"
    shutil.copytree(model, broken)
    _nan_tensor(broken, "layers.0.mlp.down_proj")
    code, out = _eval(broken, gguf, tmp_path / "q.json")
    line = _one_line(out)
    assert code != 0 and "unquantized model" in line and "non-finite logits" in line, out
    assert not (tmp_path / "q.json").exists()


@pytest.mark.parametrize("gate", [True, False])
def test_nan_in_an_artefact(tiny, tmp_path, gate):
    model, awq = tiny
    broken = tmp_path / "Broken-AWQ"
    shutil.copytree(awq, broken)
    _nan_tensor(broken, "down_proj.scales")
    res = CliRunner().invoke(app, ["eval", str(model), str(broken), "-o", str(tmp_path / "q.json"), "--ctx", "32",
                                   "--chunks", "2", "-q", *([] if gate else ["--no-gate"])])
    line = _one_line(res.output)
    assert res.exit_code != 0 and "Broken-AWQ" in line and "non-finite logits" in line, res.output
    assert not (tmp_path / "q.json").exists()
