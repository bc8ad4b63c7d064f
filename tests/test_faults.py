"""Fault injection (issue 13): every writing command, run as a real process (``python -m releaser.cli``), under a full
disk, a read-only output folder, kill -9 at several moments followed by a rerun, SIGTERM, two concurrent runs on one
output and a truncated input.

Each case checks the exit code, a single-line message without traceback, that nothing partial or temporary is left
under or beside the output (after the rerun, for kill -9), that the inputs are byte-identical, and that the output of
a rerun equals an uninterrupted run. The full disk and the read-only folder are small tmpfs mounts (root cannot bypass a
read-only mount); where mounting is not permitted these cases fail under CI=true and are skipped elsewhere.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from releaser_testing import tiny_gguf, tiny_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
IN_CI = os.environ.get("CI", "").lower() == "true"


# -- the commands --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    name: str
    args: tuple[str, ...]       # with {IN}: the inputs folder, {OUT}: the output path
    output: str                 # the output path, relative to the work folder (a folder or a file)
    produces: str               # what a successful run leaves at the output: a folder or the file list of a folder
    inputs: tuple[str, ...]     # input paths (relative to {IN}) that must stay byte-identical
    truncate: str               # the input file a truncated-input case cuts short

    def argv(self, inputs: Path, out: Path, *extra: str) -> list[str]:
        return [a.replace("{IN}", str(inputs)).replace("{OUT}", str(out)) for a in self.args] + list(extra)


COMMANDS = [
    Command("merge", ("merge", "{IN}/merge.yml", "{OUT}", "--quiet"), "merged", "folder",
            ("model", "other", "merge.yml"), "other/model.safetensors"),
    Command("fix-tokenizer", ("fix-tokenizer", "{IN}/model", "-t", "chatml", "--eos", "<|im_end|>", "-o", "{OUT}"),
            "fixed", "folder", ("model",), "model/model.safetensors"),
    Command("gguf", ("gguf", "{IN}/model", "-o", "{OUT}", "--quant", "Q8_0", "--name", "Tiny", "--quiet"),
            "gguf", "folder", ("model",), "model/model.safetensors"),
    Command("gguf-fix", ("gguf-fix", "{IN}/tiny.gguf", "--name", "Fixed", "-o", "{OUT}"), "fixed.gguf", "file",
            ("tiny.gguf",), "tiny.gguf"),
    Command("card", ("card", "{IN}/model", "-o", "{OUT}"), "README.md", "file", ("model",),
            "model/model.safetensors"),
]
IDS = [c.name for c in COMMANDS]


def releaser(argv: list[str], cwd: Path, **popen) -> subprocess.Popen:
    env = dict(os.environ, COLUMNS="300", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RELEASER_CRASH_DIR=str(cwd / "crash-reports"))
    return subprocess.Popen([sys.executable, "-m", "releaser.cli", *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def run(argv: list[str], cwd: Path) -> tuple[int, str]:
    return finish(releaser(argv, cwd))


# -- checks --------------------------------------------------------------------------------------------------------

def one_line(stderr: str, starts: str = "error:") -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and len(lines) == 1 and lines[0].startswith(starts), stderr[-3000:]
    return lines[0]


def digest(path: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``path`` (or of ``path`` itself)."""
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Temporary, partial or lock entries anywhere under ``folder`` (the output's parent)."""
    found = []
    for p in folder.rglob("*"):
        name = p.name
        if ".releaser-" in name or name.endswith(".tmp") or ".tmp-" in name or name.startswith(".") and name != \
                ".keep":
            found.append(str(p.relative_to(folder)))
    return sorted(found)


def output_of(cmd: Command, out: Path) -> dict[str, str]:
    assert out.exists(), f"{out} is missing"
    return digest(out)


# -- fixtures ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(tmp_path_factory, smollm2):
    """The commands' inputs (never modified: their digest is checked after every case)."""
    root = tmp_path_factory.mktemp("inputs")
    for name, seed in (("model", 0), ("other", 1)):
        path = tiny_model(root / name, "llama", seed=seed, layers=2, hidden=64, intermediate=128, vocab=49152)
        for f in TOKENIZER_FILES:
            shutil.copy(smollm2 / f, path / f)
    cfg = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": "model", "parameters": {"weight": 0.6}},
                      {"model": "other", "parameters": {"weight": 0.4}}]}
    (root / "merge.yml").write_text(yaml.safe_dump(cfg))
    tiny_gguf(root / "tiny.gguf", "F32", vocab=4096, hidden=128, intermediate=256)
    return root


@pytest.fixture(scope="module")
def input_digest(inputs):
    return digest(inputs)


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """Each command's output from one uninterrupted run."""
    refs = {}
    for cmd in COMMANDS:
        work = tmp_path_factory.mktemp(f"ref-{cmd.name}")
        code, err = run(cmd.argv(inputs, work / cmd.output), work)
        assert code == 0, err[-3000:]
        refs[cmd.name] = output_of(cmd, work / cmd.output)
    return refs


@pytest.fixture
def check_inputs(inputs, input_digest):
    yield
    assert digest(inputs) == input_digest, "an input was modified"


def _mount(target: Path, options: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        message = f"cannot mount a tmpfs for fault injection ({proc.stderr.strip()}); run as root"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(options) -> a fresh tmpfs folder under tmp_path, unmounted at the end."""
    mounted = []

    def mount(options: str) -> Path:
        target = tmp_path / f"mnt{len(mounted)}"
        _mount(target, options)
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def fill(folder: Path) -> None:
    """Fill the file system of ``folder`` to the last byte."""
    block = b"\0" * 65536
    with open(folder / "filler", "wb", buffering=0) as fh:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    fh.write(block[:size])
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    os.sync()


# -- the cases -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", COMMANDS, ids=IDS)
def test_full_disk(cmd, inputs, tmpfs, check_inputs):
    disk = tmpfs("size=8m")
    fill(disk)
    before = sorted(p.name for p in disk.iterdir())
    code, err = run(cmd.argv(inputs, disk / cmd.output), disk.parent)
    line = one_line(err)
    assert code in (1, 2) and ("disk" in line or "space" in line), line
    assert sorted(p.name for p in disk.iterdir()) == before and leftovers(disk) == []


@pytest.mark.parametrize("cmd", COMMANDS, ids=IDS)
def test_read_only_output_folder(cmd, inputs, tmpfs, check_inputs):
    folder = tmpfs("size=8m")
    (folder / ".keep").write_text("")
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    code, err = run(cmd.argv(inputs, folder / cmd.output), folder.parent)
    line = one_line(err)
    assert code in (1, 2) and ("read-only" in line or "permission" in line.lower() or "cannot write" in line), line
    assert sorted(p.name for p in folder.iterdir()) == [".keep"]


@pytest.mark.parametrize("cmd", COMMANDS, ids=IDS)
def test_truncated_input(cmd, inputs, tmp_path):
    copy = tmp_path / "inputs"
    shutil.copytree(inputs, copy, ignore=shutil.ignore_patterns(".*"))
    victim = copy / cmd.truncate
    os.truncate(victim, victim.stat().st_size * 2 // 3)
    before = digest(copy)
    work = tmp_path / "work"
    work.mkdir()
    code, err = run(cmd.argv(copy, work / cmd.output), work)
    line = one_line(err)
    assert code == 2 and victim.name in line and ("truncated" in line or "damaged" in line), line
    assert sorted(p.name for p in work.iterdir() if p.name != "crash-reports") == []
    assert digest(copy) == before


def _size(path: Path) -> int:
    try:
        return path.stat().st_size if path.is_file() else 0
    except FileNotFoundError:   # a temporary entry renamed or removed meanwhile
        return 0


def _watch(proc: subprocess.Popen, work: Path, moment: str, timeout: float = 300) -> bool:
    """Wait for ``moment`` ("start": the first entry the run creates in ``work``; "writing": the first byte of
    output data) and freeze the process there (SIGSTOP). False when the run finished first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        entries = [p for p in work.rglob("*") if p.name != "crash-reports"]
        if moment == "start" and entries or moment == "writing" and any(
                _size(p) > 0 for p in entries if ".releaser-lock" not in p.name):
            os.kill(proc.pid, signal.SIGSTOP)
            return True
        time.sleep(0.002)
    raise AssertionError(f"the run reached no '{moment}' moment in {timeout} s")


@pytest.mark.parametrize("moment", ["start", "writing"])
@pytest.mark.parametrize("cmd", COMMANDS, ids=IDS)
def test_kill_9_then_rerun(cmd, moment, inputs, reference, tmp_path, check_inputs):
    work = tmp_path / "work"
    work.mkdir()
    out = work / cmd.output
    proc = releaser(cmd.argv(inputs, out), work)
    caught = _watch(proc, work, moment)
    if caught:
        os.kill(proc.pid, signal.SIGKILL)
    finish(proc)
    code, err = run(cmd.argv(inputs, out, "--overwrite"), work)
    assert code == 0, err[-3000:]
    assert output_of(cmd, out) == reference[cmd.name]
    assert leftovers(work) == []


@pytest.mark.parametrize("cmd", COMMANDS, ids=IDS)
def test_sigterm_cleans_up(cmd, inputs, reference, tmp_path, check_inputs):
    work = tmp_path / "work"
    work.mkdir()
    out = work / cmd.output
    proc = releaser(cmd.argv(inputs, out), work)
    caught = _watch(proc, work, "start")
    if caught:
        os.kill(proc.pid, signal.SIGTERM)
        os.kill(proc.pid, signal.SIGCONT)
    code, err = finish(proc)
    if caught and code != 0:
        assert code == 143 and one_line(err, "terminated"), err[-3000:]
    if out.exists():   # SIGTERM after the output was complete: it is whole; otherwise there is none
        assert output_of(cmd, out) == reference[cmd.name]
    assert leftovers(work) == []


@pytest.mark.parametrize("cmd", COMMANDS, ids=IDS)
def test_two_concurrent_runs(cmd, inputs, reference, tmp_path, check_inputs):
    work = tmp_path / "work"
    work.mkdir()
    out = work / cmd.output
    procs = [releaser(cmd.argv(inputs, out), work) for _ in range(2)]
    results = [finish(p) for p in procs]
    for code, err in results:
        if code != 0:
            line = one_line(err)
            assert code == 2 and ("another releaser run" in line or "already exists" in line), line
    assert any(code == 0 for code, _ in results), results
    assert output_of(cmd, out) == reference[cmd.name]   # whoever said "done" left a complete output
    assert leftovers(work) == []
