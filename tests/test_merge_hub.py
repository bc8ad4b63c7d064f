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

from releaser.testing import noised_variant, tiny_model

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
        {"model": f"org/tuned@v2", "lora": {"path": "org/lora", "weight": 0.5},
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
