"""Benchmark `releaser publish` against huggingface_hub's own `upload_folder` (one call per repo, with
delete_patterns="*" so stale files go too), both as whole processes under /usr/bin/time -v, each against its own
fake Hub (tests/fakehub.py, 127.0.0.1, LFS path) that counts requests and bytes received.

Cases on a three-repo release (Name, Name-GGUF, Name-AWQ; sizes scaled by --mb): first publish, the same release
again (unchanged), and a tokenizer fix (one small file changed).

    python bench/bench_publish.py [--mb 300]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from fakehub import FakeHub  # noqa: E402

PEER = """
import sys
from pathlib import Path
from huggingface_hub import HfApi
api = HfApi()
release = Path(sys.argv[1])
for repo_id in sys.argv[2:]:
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=release / repo_id.split("/")[1], delete_patterns="*",
                      commit_message="upload")
"""
REPOS = ["me/Bench", "me/Bench-GGUF", "me/Bench-AWQ"]


def write_release(root: Path, mb: int, eos: str) -> None:
    sizes = {"Bench": [("model-00001-of-00002.safetensors", 0.3), ("model-00002-of-00002.safetensors", 0.3)],
             "Bench-GGUF": [("Bench-Q4_K_M.gguf", 0.15), ("Bench-Q8_0.gguf", 0.15)],
             "Bench-AWQ": [("model.safetensors", 0.1)]}
    for name, files in sizes.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "README.md").write_text(f"---\nlicense: mit\n---\n# {name}\n")
        (folder / "config.json").write_text('{"hidden_size": 64}\n')
        for fname, share in files:
            path = folder / fname
            if not path.exists():
                with open(path, "wb") as fh:
                    left = int(mb * 1e6 * share)
                    while left:
                        block = os.urandom(min(left, 1 << 24))
                        fh.write(block)
                        left -= len(block)
    (root / "Bench" / "tokenizer_config.json").write_text(f'{{"eos_token": "{eos}"}}\n')


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    _, m, s = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr).groups()
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1e3
    return int(m) * 60 + float(s), rss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=300, help="release size in MB")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-publish-"))
    release = work / "release"
    recipe = work / "recipe.yml"
    recipe.write_text("name: me/Bench\ndescription: bench\nquants: {gguf: me/Bench-GGUF, awq: me/Bench-AWQ}\n"
                      "releases: [{version: '1.0', date: 2026-11-30, changes: [First release.]}]\n")
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE"))}
    base_env.update(HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HOME=str(work / "hf-home"),
                    PYTHONPATH=str(ROOT))
    ours_cmd = [sys.executable, "-m", "releaser.cli", "publish", str(release), "--recipe", str(recipe)]
    peer_cmd = [sys.executable, "-c", PEER, str(release), *REPOS]
    try:
        with FakeHub(work / "hub-ours") as ours, FakeHub(work / "hub-peer") as peer:
            print(f"release: {args.mb} MB in 3 repos; fake Hub on 127.0.0.1 (LFS path)")
            print(f"{'case':<16} {'tool':<22} {'wall s':>7} {'RSS MB':>7} {'requests':>8} {'writes':>6} "
                  f"{'commits':>7} {'MB received':>11}")
            for case, eos in (("first publish", "<|im_end|>"), ("unchanged", "<|im_end|>"),
                              ("tokenizer fix", "</s>")):
                write_release(release, args.mb, eos)
                for tool, hub, cmd in (("releaser publish", ours, ours_cmd), ("upload_folder x3", peer, peer_cmd)):
                    hub.reset_counts()
                    env = dict(base_env, HF_ENDPOINT=hub.url, HF_TOKEN=hub.token)
                    wall, rss = timed(cmd, env)
                    writes = sum(r.method != "GET" for r in hub.requests)
                    received = sum(r.received for r in hub.requests) / 1e6
                    print(f"{case:<16} {tool:<22} {wall:7.2f} {rss:7.0f} {len(hub.requests):8d} {writes:6d} "
                          f"{hub.commits:7d} {received:11.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
