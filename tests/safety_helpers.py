"""Shared by the "nothing lost, nothing leaked" tests (test_safety_*.py): a tiny model, a recipe releasing it, and the
CLI run in-process as a user would type it."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from releaser.cli import app
from releaser_testing import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model(path, vocab=256)
    tiny_tokenizer(path)
    return path


def run(*args) -> tuple[int, str]:
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, res.output


def one_line_error(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in output, output
    return errors[0]


def recipe(tmp_path: Path, model: Path, extra: str = "", name: str = "me/Tiny") -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(f"name: {name}\ndescription: A tiny release.\nstop_audit: false\nmodel: {model}\n"
                    "tokenizer: {template: chatml}\n" + extra)
    return path


def release(tmp_path: Path, model: Path, *args, extra: str = "") -> Path:
    """A finished release of the tiny model in ``tmp_path/work``; returns the recipe."""
    path = recipe(tmp_path, model, extra)
    code, output = run("release", path, "-o", tmp_path / "work", *args)
    assert code == 0, output
    return path
