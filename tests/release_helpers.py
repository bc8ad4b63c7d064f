"""Shared by the release tests: the demo recipe laid out in a temporary folder, and running ``releaser release`` as a
real process."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "SmolLM2-Slerp-135M"


def demo_layout(root: Path) -> Path:
    """recipes/demo.yaml and its merge config under ``root/recipes``, the inputs under ``root/demo``; returns the
    recipe path."""
    from releaser_testing import demo_inputs

    demo_inputs(root / "demo")
    (root / "recipes").mkdir(exist_ok=True)
    for name in ("demo.yaml", "smollm2-slerp.yml"):
        shutil.copy(ROOT / "recipes" / name, root / "recipes" / name)
    shutil.copytree(ROOT / "recipes" / "lora", root / "recipes" / "lora")
    return root / "recipes" / "demo.yaml"


def cli(*args, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "releaser.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def timed_release(recipe: Path, work: Path, *extra) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = cli("release", recipe, "-o", work, *extra)
    return proc, time.perf_counter() - start


def tree(root: Path) -> dict[str, tuple[str, int]]:
    """Relative path -> (sha256, mtime_ns) of every file under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[p.relative_to(root).as_posix()] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def hashes(root: Path, exclude: tuple[str, ...] = ("release.json",)) -> dict[str, str]:
    return {k: v[0] for k, v in tree(root).items() if k not in exclude}


def link_copy(src: Path, dst: Path) -> Path:
    """A copy of a work folder made of hard links (releaser replaces files by rename, so ``src`` stays intact)."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def tiny_merge_recipe(root: Path, inputs: Path, name: str, gguf: str, extra: str = "") -> Path:
    """``root/r.yaml``: the linear merge of the tiny models ``inputs/a`` and ``inputs/b``, ChatML, the ``gguf``
    section's line(s), quality on two short windows and ``extra``, as the executor and unit tests release it."""
    path = root / "r.yaml"
    path.write_text(f"""name: me/{name}
description: A tiny release ({name}).
stop_audit: false
merge:
  merge_method: linear
  dtype: float32
  models:
    - {{model: {inputs / 'a'}, parameters: {{weight: 0.6}}}}
    - {{model: {inputs / 'b'}, parameters: {{weight: 0.4}}}}
tokenizer: {{template: chatml}}
{gguf}quality: {{ctx: 64, chunks: 2, stop_test: false}}
{extra}""")
    return path
