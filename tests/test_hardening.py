"""Issue 13: bad inputs and faults end in one clear line, refuse to overwrite, and write nothing broken."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
import yaml
from typer.testing import CliRunner

from releaser.cli import app
from releaser.errors import ConfigError, ModelError, OutputError
from releaser_testing import tiny_gguf, tiny_model, tiny_tokenizer


@pytest.fixture
def model(tmp_path):
    path = tiny_model(tmp_path / "model", seed=0)
    tiny_tokenizer(path)
    return path


@pytest.fixture
def gguf_file(tmp_path):
    return tiny_gguf(tmp_path / "tiny.gguf")


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})
    return result.exit_code, result.output


def one_line_error(output: str) -> str:
    """The output is exactly one line starting with 'error:' and holds no traceback."""
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in output, output
    return lines[0]


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def truncate(path, keep: float = 0.5):
    size = os.path.getsize(path)
    os.truncate(path, int(size * keep))


# -- item 3: truncated or inconsistent checkpoints, before any work starts ---------------------------------------------

def test_truncated_safetensors_is_one_line_naming_the_file(model, tmp_path):
    from releaser.checkpoint import CheckpointReader

    truncate(model / "model.safetensors")
    with pytest.raises(ModelError, match=r"model\.safetensors is not a valid safetensors file \(truncated: the header "
                                         r"describes \d+ bytes of tensor data, the file holds \d+\)"):
        CheckpointReader(model)


def test_safetensors_with_trailing_bytes_is_inconsistent(model):
    from releaser.checkpoint import CheckpointReader

    with open(model / "model.safetensors", "ab") as fh:
        fh.write(b"\0" * 16)
    with pytest.raises(ModelError, match="inconsistent: the file holds"):
        CheckpointReader(model)


def test_truncated_input_merge_is_one_line_and_writes_nothing(model, tmp_path):
    other = tiny_model(tmp_path / "other", seed=1)
    truncate(other / "model.safetensors", 0.9)
    cfg = {"merge_method": "linear", "models": [{"model": str(model), "parameters": {"weight": 0.5}},
                                                 {"model": str(other), "parameters": {"weight": 0.5}}]}
    (tmp_path / "m.yml").write_text(yaml.safe_dump(cfg))
    code, output = cli("merge", tmp_path / "m.yml", tmp_path / "out")
    assert code == 2 and "other/model.safetensors is not a valid safetensors file (truncated" in one_line_error(output)
    assert not (tmp_path / "out").exists()


# -- item 6: the CLI turns every failure into one line ----------------------------------------------------------------

def test_unforeseen_exception_is_one_line_plus_a_report(model, tmp_path, monkeypatch):
    import releaser.merge

    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(releaser.merge, "run_merge", boom)
    monkeypatch.setenv("RELEASER_CRASH_DIR", str(tmp_path / "crash"))
    (tmp_path / "m.yml").write_text("merge_method: linear\n")
    code, output = cli("merge", tmp_path / "m.yml", tmp_path / "out")
    line = one_line_error(output)
    assert code == 70 and "unexpected RuntimeError: boom second line; the full report is in" in line
    reports = list((tmp_path / "crash").glob("crash-*.txt"))
    assert len(reports) == 1 and str(reports[0]) in line
    text = reports[0].read_text()
    assert "Traceback" in text and "RuntimeError: boom" in text and "merge" in text


@pytest.mark.parametrize("err, words", [(28, "the disk is full"), (13, "permission denied"), (30, "read-only")])
def test_os_errors_are_one_line(model, tmp_path, monkeypatch, err, words):
    import releaser.merge

    def fail(*args, **kwargs):
        raise OSError(err, os.strerror(err), str(tmp_path / "out" / "x"))

    monkeypatch.setattr(releaser.merge, "run_merge", fail)
    (tmp_path / "m.yml").write_text("merge_method: linear\n")
    code, output = cli("merge", tmp_path / "m.yml", tmp_path / "out")
    line = one_line_error(output)
    assert code == 1 and line.startswith(f"error: {tmp_path / 'out' / 'x'}: ") and words in line


# -- gguf-fix: items 2, 6, 7, 8 ----------------------------------------------------------------------------------------

def test_gguf_fix_refuses_an_existing_output_file(gguf_file, tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("my notes")
    code, output = cli("gguf-fix", gguf_file, "-o", other, "--name", "X")
    assert code == 2 and "already exists; pass --overwrite" in one_line_error(output)
    assert other.read_text() == "my notes"
    code, output = cli("gguf-fix", gguf_file, "-o", other, "--name", "X", "--overwrite")
    assert code == 0 and other.read_bytes()[:4] == b"GGUF"


def test_gguf_fix_output_folder_is_one_line(gguf_file, tmp_path):
    (tmp_path / "folder").mkdir()
    code, output = cli("gguf-fix", gguf_file, "-o", tmp_path / "folder", "--name", "X")
    assert code == 2 and "is a folder" in one_line_error(output)
    assert list((tmp_path / "folder").iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == \
        ["folder", "tiny.gguf"]


def test_gguf_fix_validates_the_chat_template_before_writing(gguf_file, tmp_path):
    before = gguf_file.read_bytes()
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}{{ m['content'] }}")
    code, output = cli("gguf-fix", gguf_file, "--chat-template", tmp_path / "bad.jinja")
    assert code == 2 and "Jinja syntax error" in one_line_error(output)
    assert gguf_file.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jinja", "tiny.gguf"]


@pytest.mark.parametrize("mode", [0o644, 0o640])
def test_gguf_fix_keeps_the_file_mode(gguf_file, tmp_path, mode):
    os.chmod(gguf_file, mode)
    assert cli("gguf-fix", gguf_file, "--name", "In place")[0] == 0
    assert stat.S_IMODE(gguf_file.stat().st_mode) == mode
    assert cli("gguf-fix", gguf_file, "--name", "Copy", "-o", tmp_path / "copy.gguf")[0] == 0
    assert stat.S_IMODE((tmp_path / "copy.gguf").stat().st_mode) == mode


def test_truncated_gguf_is_named_not_numpy_text(gguf_file):
    truncate(gguf_file, 0.6)
    code, output = cli("gguf-fix", gguf_file, "--name", "X")
    line = one_line_error(output)
    assert code == 2 and "tiny.gguf is truncated or damaged" in line and "reshape" not in line


def test_gguf_fix_messages_name_real_options(gguf_file, tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    code, output = cli("gguf-fix", gguf_file, "-o", tmp_path / "blocker" / "x.gguf", "--name", "X")
    assert code != 0 and not re.search(r"--out(?!put)", one_line_error(output))


# -- item 4: fix-tokenizer never adds an untrained eos by typo, never writes a fix that fails its own re-check --------

def test_fix_tokenizer_refuses_an_eos_that_is_not_a_token(model, tmp_path):
    before = snapshot(model)
    code, output = cli("fix-tokenizer", model, "-t", "chatml", "--eos", "<|nope|>", "-o", tmp_path / "out")
    line = one_line_error(output)
    assert code == 2 and "'<|nope|>' is not in the vocabulary" in line and "such as '<|im_end|>'" in line
    assert not (tmp_path / "out").exists() and snapshot(model) == before


def test_fix_that_fails_its_recheck_writes_nothing(model, tmp_path):
    before = snapshot(model)
    code, output = cli("fix-tokenizer", model, "-t", "llama3", "--eos", "<|im_end|>", "-o", tmp_path / "out")
    line = one_line_error(output)
    assert code == 2 and "so nothing was written" in line and "'<|eot_id|>'" in line
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    code, output = cli("fix-tokenizer", model, "-t", "llama3", "--eos", "<|im_end|>", "--in-place")
    assert code == 2 and "so nothing was written" in one_line_error(output)
    assert snapshot(model) == before


# -- item 8: messages that say what is wrong ---------------------------------------------------------------------------

def test_hidden_size_mismatch_does_not_suggest_tokenizer_source(model, tmp_path):
    other = tiny_model(tmp_path / "wide", seed=1, hidden=128, intermediate=256)
    cfg = {"merge_method": "linear", "models": [{"model": str(model), "parameters": {"weight": 0.5}},
                                                 {"model": str(other), "parameters": {"weight": 0.5}}]}
    (tmp_path / "m.yml").write_text(yaml.safe_dump(cfg))
    code, output = cli("merge", tmp_path / "m.yml", tmp_path / "out")
    line = one_line_error(output)
    assert code == 2 and "shape mismatch" in line and "tokenizer_source" not in line and "differ in size" in line


def test_model_path_that_is_a_file(model, tmp_path):
    for args in (["fix-tokenizer", model / "config.json", "-t", "chatml", "-o", tmp_path / "o"],
                 ["doctor", model / "config.json"], ["card", model / "config.json"],
                 ["gguf", model / "model.safetensors", "-o", tmp_path / "g"]):
        code, output = cli(*args)
        line = one_line_error(output)
        assert code == 2 and "is a file, not a model folder" in line and "does not exist" not in line, args


def test_missing_template_file_is_not_an_unknown_template(model, tmp_path):
    code, output = cli("doctor", model, "-t", tmp_path / "mine.jinja")
    line = one_line_error(output)
    assert code == 2 and "chat template file" in line and "does not exist" in line and "unknown" not in line
    code, output = cli("doctor", model, "-t", "chatmll")
    assert code == 2 and "unknown chat template 'chatmll'" in one_line_error(output)


def test_unknown_pre_tokenizer_mentions_the_option():
    from releaser.gguf.vocab import pre_tokenizer

    class Odd:
        def encode(self, text):
            return [len(text), 12345]

    with pytest.raises(ModelError, match="--pre-tokenizer"):
        pre_tokenizer(Odd())


def test_doctor_with_a_template_that_cannot_render_is_not_clean(model, tmp_path):
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m.content.nope() }}{% endfor %}")
    result = CliRunner().invoke(app, ["doctor", str(model), "-t", str(tmp_path / "broken.jinja"), "--json"])
    report = json.loads(result.output)
    assert result.exit_code == 1 and not report["clean"]
    assert "template-render" in {f["code"] for f in report["findings"]}


@pytest.mark.parametrize("template, words", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),
    ("{% for m in messages %}{{ m.content }}", "TemplateSyntaxError"),
])
def test_model_with_a_bad_own_chat_template(model, tmp_path, template, words):
    (model / "chat_template.jinja").write_text(template)
    code, output = cli("card", model)
    line = one_line_error(output)
    assert code == 2 and f"the chat template of {model} cannot be rendered ({words}" in line
    (tmp_path / "own.jinja").write_text(template)
    code, output = cli("fix-tokenizer", model, "-t", tmp_path / "own.jinja", "-o", tmp_path / "out")
    assert code == 2 and "own" in one_line_error(output) and not (tmp_path / "out").exists()


# -- item 2: no command writes over an existing file without --overwrite, or over an input ever ----------------------

def test_card_refuses_an_existing_output_and_its_inputs(model, tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("mine")
    code, output = cli("card", model, "-o", notes)
    assert code == 2 and "already exists; pass --overwrite" in one_line_error(output) and notes.read_text() == "mine"
    assert cli("card", model, "-o", notes, "--overwrite")[0] == 0 and notes.read_text().startswith("---")
    before = snapshot(model)
    code, output = cli("card", model, "-o", model / "config.json", "--overwrite")
    assert code == 2 and "is an input of the card" in one_line_error(output) and snapshot(model) == before
    code, output = cli("card", model, "-o", tmp_path)
    assert code == 2 and "is a folder" in one_line_error(output)
    assert cli("card", model, "-o", model / "README.md")[0] == 0 and (model / "README.md").is_file()


def test_fix_tokenizer_never_replaces_a_folder_holding_its_input(model, tmp_path):
    before = snapshot(tmp_path)
    code, output = cli("fix-tokenizer", model, "-t", "chatml", "-o", tmp_path, "--overwrite")
    assert code == 2 and "holds the input folder" in one_line_error(output) and snapshot(tmp_path) == before


# -- item 9: CLI habits ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["merge", "card", "fix-tokenizer", "gguf", "gguf-fix", "doctor"])
def test_flags_show_no_value_in_help(command):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    for line in result.output.splitlines():
        if re.search(r"--(overwrite|quiet|in-place|json)\b", line):
            assert "<bool>" not in line, line


def test_q_means_quiet_everywhere(model, tmp_path):
    for command in ("merge", "gguf"):
        result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert re.search(r"--quiet\s+-q\b", result.output), command
    code, output = cli("gguf", model, "-o", tmp_path / "g", "-q", "Q8_0")   # the old meaning of -q
    line = one_line_error(output)
    assert code == 2 and "-q means --quiet" in line and "--quant Q8_0" in line and not (tmp_path / "g").exists()


def test_first_k_quant_run_is_announced(tmp_path):
    """The K-quant kernels' compilation (first run on a machine, ~10 s) is detected, so the progress bar can say so."""
    import subprocess
    import sys

    code = ("from releaser.gguf import kernels; from gguf import GGMLQuantizationType as T\n"
            "print(kernels.needs_compile({T.Q6_K}), kernels.needs_compile({T.Q8_0}))\n"
            "kernels.warm_up({T.Q6_K}); print(kernels.needs_compile({T.Q6_K}))\n")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))   # an empty numba cache: a first run
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.stdout.split() == ["True", "False", "False"], out.stderr[-2000:]


def test_export_says_it_compiles_kernels(monkeypatch):
    from contextlib import contextmanager

    import numpy as np
    from gguf import GGMLQuantizationType as T

    from releaser.gguf import export, kernels
    from releaser.stage import Reporter

    shown = []

    class Recorder(Reporter):
        def message(self, text):
            shown.append(text)

        @contextmanager
        def progress(self, description, total=None):
            shown.append(description)
            yield lambda n=1, description=None: shown.append(description)

    class Conv:
        plan = [type("Plan", (), {"name": "w", "shape": (1, 256)})()]

        @staticmethod
        def read(plan):
            return np.zeros((1, 256), np.float32)

    class Writer:
        def write_tensor_data(self, data):
            shown.append("written")

    monkeypatch.setattr(kernels, "warm_up", lambda types, weighted=False: shown.append(
        f"warm {sorted(t.name for t in types)}"))
    monkeypatch.setattr(kernels, "submit", lambda pool, data, t, weights=None: [])
    monkeypatch.setattr(kernels, "collect", lambda futures: b"")
    for first_run in (True, False):
        shown.clear()
        monkeypatch.setattr(kernels, "needs_compile", lambda types, weighted=False, first_run=first_run: first_run)
        with export._quantizing(Conv, {"Q6_K": [T.Q6_K]}, 1, Recorder(), {}) as tensors:
            export._write_tensors(Conv, {"Q6_K": [T.Q6_K]}, {"Q6_K": Writer()}, tensors, Recorder())
        compiling = ["compiling quantization kernels (first run only)"] if first_run else []
        # the kernels warm up on the reading thread, before the first tensor is quantized, so before it is written
        assert shown[:len(compiling)] == compiling and shown.index("warm ['Q6_K']") < shown.index("written")
        assert [s for s in shown[len(compiling):] if not s.startswith("warm")] == \
            ["GGUF export", "written", "GGUF export: w"]


def test_card_without_recipe_shows_no_absolute_paths(model, tmp_path):
    other = tiny_model(tmp_path / "other", seed=1)
    cfg = {"merge_method": "linear", "base_model": str(model),
           "models": [{"model": str(model), "parameters": {"weight": 0.5}},
                      {"model": str(other), "parameters": {"weight": 0.5}}]}
    (tmp_path / "m.yml").write_text(yaml.safe_dump(cfg))
    assert cli("merge", tmp_path / "m.yml", tmp_path / "out")[0] == 0
    code, output = cli("card", tmp_path / "out")
    assert code == 0 and str(tmp_path) not in output and "- `other` (weight: 0.5)" in output


def test_a_failed_first_export_leaves_no_output_folder(tmp_path, monkeypatch):
    """atomic.output_files removes the folder a failed run created (it is empty): nothing beside the output."""
    from releaser.atomic import output_files

    with pytest.raises(OSError, match="disk on fire"):
        with output_files(tmp_path / "new") as staging:
            (staging / "x.gguf").write_bytes(b"partial")
            raise OSError(28, "disk on fire")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    with pytest.raises(OSError):
        with output_files(tmp_path / "kept"):
            raise OSError(28, "disk on fire")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]   # a folder that was there stays


def test_sweep_removes_locks_of_dead_temporary_folders(tmp_path):
    """A run killed while writing into its own temporary folder (the release pipeline's GGUF stage) leaves a lock
    beside that folder; the next run on the output removes it with the folder."""
    from releaser.atomic import output_dir

    (tmp_path / ".out.releaser-tmp-abc").mkdir()
    (tmp_path / "..out.releaser-tmp-abc.releaser-lock").write_text("")
    (tmp_path / ".other.releaser-lock").write_text("")   # another output's lock is not ours to touch
    with output_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.releaser-lock", "out"]
