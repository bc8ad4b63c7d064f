"""Hub model references (``org/name``, ``org/name@revision``) for models and adapters, resolved offline from a
pre-populated Hugging Face cache (HF_HOME), and the errors when a repo or revision is not there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_merge_lora import make_adapter

from releaser_testing import noised_variant, tiny_model

COMMIT_A, COMMIT_B1, COMMIT_B2, COMMIT_L = ("a" * 40, "b" * 40, "c" * 40, "d" * 40)


def cache_repo(hub: Path, repo: str, commit: str, src: Path, refs: tuple[str, ...] = ("main",)) -> None:
    """Put ``src``'s files into the HF cache layout as ``repo`` at ``commit`` (refs point at it)."""
    root = hub / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, snap / f.name)
    (root / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubcache")
    base = tiny_model(root / "src-base", seed=0, layers=2)
    v1 = noised_variant(base, root / "src-v1", seed=1)
    v2 = noised_variant(base, root / "src-v2", seed=2)
    adapter = make_adapter(base, root / "src-lora", 3, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    hub = root / "home" / "hub"
    cache_repo(hub, "org/base", COMMIT_A, base)
    cache_repo(hub, "org/tuned", COMMIT_B1, v1, refs=("main",))
    cache_repo(hub, "org/tuned", COMMIT_B2, v2, refs=("v2",))
    cache_repo(hub, "org/lora", COMMIT_L, adapter)
    return root, root / "home", {"base": base, "v1": v1, "v2": v2, "lora": adapter}


def run_cli(cfg: dict, cwd: Path, home: Path, out: Path) -> subprocess.CompletedProcess:
    path = cwd / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("HF_HUB_CACHE", None)
    code = "import sys; from releaser.cli import app; sys.argv = ['releaser'] + sys.argv[1:]; app()"
    return subprocess.run([sys.executable, "-c", code, "merge", str(path), str(out), "--quiet"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_hub_ids_and_revisions_resolve_from_the_cache(hub_home, tmp_path):
    _, home, src = hub_home
    cfg = {"merge_method": "ties", "base_model": "org/base", "dtype": "float32", "models": [
        {"model": "org/base"},
        {"model": "org/tuned", "parameters": {"weight": 0.5, "density": 0.5}},
        {"model": "org/tuned@v2", "lora": {"path": "org/lora", "weight": 0.5},
         "parameters": {"weight": 0.5, "density": 0.5}},
        {"model": f"org/tuned@{COMMIT_B1}+org/lora", "parameters": {"weight": 0.3, "density": 0.7}}]}
    proc = run_cli(cfg, tmp_path, home, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    local = {"merge_method": "ties", "base_model": str(src["base"]), "dtype": "float32", "models": [
        {"model": str(src["base"])},
        {"model": str(src["v1"]), "parameters": {"weight": 0.5, "density": 0.5}},
        {"model": str(src["v2"]), "lora": {"path": str(src["lora"]), "weight": 0.5},
         "parameters": {"weight": 0.5, "density": 0.5}},
        {"model": f"{src['v1']}+{src['lora']}", "parameters": {"weight": 0.3, "density": 0.7}}]}
    from releaser.merge import run_merge

    run_merge(local, tmp_path / "local")
    got, want = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "local" / "model.safetensors")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert "org/tuned@v2" in (tmp_path / "out" / "mergekit_config.yml").read_text()


@pytest.mark.parametrize("ref, needles", [
    ("org/tuned@v3", ["org/tuned@v3", "not in the Hugging Face cache", "HF_HUB_OFFLINE", "--revision v3"]),
    ("org/missing", ["org/missing", "not in the Hugging Face cache"]),
])
def test_missing_revision_or_repo_offline(hub_home, tmp_path, ref, needles):
    _, home, _ = hub_home
    cfg = {"merge_method": "linear", "models": [{"model": "org/base", "parameters": {"weight": 1.0}},
                                                {"model": ref, "parameters": {"weight": 1.0}}]}
    proc = run_cli(cfg, tmp_path, home, tmp_path / "out")
    err = proc.stderr.strip()
    assert proc.returncode != 0 and err.startswith("error:") and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "out").exists()


def test_missing_adapter_repo_offline(hub_home, tmp_path):
    _, home, _ = hub_home
    cfg = {"merge_method": "passthrough", "models": [{"model": "org/base", "lora": {"path": "org/nolora"}}]}
    proc = run_cli(cfg, tmp_path, home, tmp_path / "out")
    err = proc.stderr.strip()
    assert proc.returncode != 0 and "LoRA adapter org/nolora" in err and len(err.splitlines()) == 1, err


# ------------------------------------------------------------------------------------- a fake Hub on 127.0.0.1

import hashlib  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from urllib.parse import unquote, urlparse  # noqa: E402

TOKEN = "hf_fake_token_for_tests"


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, repos: dict):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos = repos          # repo -> {"refs": {rev: commit}, "commits": {commit: {file: bytes}}, "gated": bool}
        self.fetched: list[str] = []


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, code: int, kind: str, head: bool):
        self._send(code, json.dumps({"error": kind}).encode(), {"X-Error-Code": kind,
                                                                 "Content-Type": "application/json"}, head)

    def _repo(self, repo: str, rev: str, head: bool):
        info = self.server.repos.get(repo)
        if info is None:
            return self._error(404, "RepoNotFound", head), None, None
        if info.get("gated") and self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._error(403, "GatedRepo", head), None, None
        commit = rev if rev in info["commits"] else info["refs"].get(rev)
        if commit is None:
            return self._error(404, "RevisionNotFound", head), None, None
        return None, commit, info["commits"][commit]

    def _serve(self, head: bool):
        parts = [unquote(p) for p in urlparse(self.path).path.split("/") if p]
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo, rev = f"{parts[2]}/{parts[3]}", parts[5]
            _, commit, files = self._repo(repo, rev, head)
            if commit is None:
                return
            if parts[4] == "revision":
                body = {"id": repo, "modelId": repo, "sha": commit,
                        "siblings": [{"rfilename": f} for f in files]}
            else:
                body = [{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                        for f, d in files.items()]
            return self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, rev, name = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
            _, commit, files = self._repo(repo, rev, head)
            if commit is None:
                return
            if name not in files:
                return self._error(404, "EntryNotFound", head)
            if not head:
                self.server.fetched.append(f"{repo}/{name}")
            data = files[name]
            return self._send(200, data, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                          "Content-Type": "application/octet-stream"}, head)
        self._error(404, "EntryNotFound", head)

    def do_GET(self):
        self._serve(False)

    def do_HEAD(self):
        self._serve(True)


def _files(folder: Path, extra: dict | None = None) -> dict[str, bytes]:
    out = {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}
    out.update(extra or {})
    return out


@pytest.fixture(scope="module")
def fake_hub(hub_home):
    _, _, src = hub_home
    decoys = {"README.md": b"# card", "pytorch_model.bin": b"not read", "training_args.bin": b"x"}
    repos = {
        "org/base": {"refs": {"main": COMMIT_A}, "commits": {COMMIT_A: _files(src["base"], decoys)}},
        "org/tuned": {"refs": {"main": COMMIT_B1, "v2": COMMIT_B2},
                      "commits": {COMMIT_B1: _files(src["v1"]), COMMIT_B2: _files(src["v2"])}},
        "org/lora": {"refs": {"main": COMMIT_L}, "commits": {COMMIT_L: _files(src["lora"], {"README.md": b"x"})},
                     "gated": True},
    }
    server = FakeHub(repos)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def run_online(cfg: dict, cwd: Path, server: FakeHub, token: str | None) -> subprocess.CompletedProcess:
    path = cwd / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, HF_HOME=str(cwd / "home"), HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0",
               HF_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}", PYTHONPATH=os.pathsep.join(sys.path),
               HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    code = "import sys; from releaser.cli import app; sys.argv = ['releaser'] + sys.argv[1:]; app()"
    return subprocess.run([sys.executable, "-c", code, "merge", str(path), str(cwd / "out"), "--quiet"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def test_download_from_a_fake_hub(hub_home, fake_hub, tmp_path):
    _, _, src = hub_home
    cfg = {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": "org/base", "parameters": {"weight": 0.5}},
        {"model": "org/tuned@v2", "lora": {"path": "org/lora", "weight": 0.5}, "parameters": {"weight": 0.5}}]}
    fake_hub.fetched.clear()
    proc = run_online(cfg, tmp_path, fake_hub, TOKEN)
    assert proc.returncode == 0, proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr
    assert "Fetching" not in proc.stderr and "%|" not in proc.stderr   # no huggingface_hub progress bars
    fetched = set(fake_hub.fetched)
    assert {"org/base/model.safetensors", "org/base/config.json", "org/tuned/model.safetensors",
            "org/lora/adapter_model.safetensors", "org/lora/adapter_config.json"} <= fetched
    assert not {f for f in fetched if f.endswith((".bin", "README.md"))}, fetched   # only what a merge reads
    from releaser.merge import run_merge

    local = {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(src["base"]), "parameters": {"weight": 0.5}},
        {"model": str(src["v2"]), "lora": {"path": str(src["lora"]), "weight": 0.5}, "parameters": {"weight": 0.5}}]}
    run_merge(local, tmp_path / "local")
    got, want = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "local" / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("model, lora, token, needles", [
    ("org/tuned@v9", None, None, ["org/tuned@v9", "revision v9 does not exist"]),
    ("org/nothere", None, None, ["org/nothere not found"]),
    ("org/tuned", "org/lora", None, ["LoRA adapter org/lora is gated", "HF_TOKEN"]),
])
def test_fake_hub_errors(fake_hub, tmp_path, model, lora, token, needles):
    entry = {"model": model, "parameters": {"weight": 1.0}}
    if lora:
        entry["lora"] = {"path": lora}
    cfg = {"merge_method": "linear", "models": [{"model": "org/base", "parameters": {"weight": 1.0}}, entry]}
    proc = run_online(cfg, tmp_path, fake_hub, token)
    err = proc.stderr.strip()
    assert proc.returncode != 0 and err.startswith("error:") and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "out").exists()
