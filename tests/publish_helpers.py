"""Shared pieces of the publish tests: a small three-repo release on disk and a fake Hub the real client talks to."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from fakehub import FakeHub

MAIN, GGUF, AWQ = "me/Tiny-Merge", "me/Tiny-Merge-GGUF", "me/Tiny-Merge-AWQ"
WEIGHTS = (".safetensors", ".gguf")


def _bytes(seed: str, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def write_release(root: Path, *, shards: int = 2, quants: tuple[str, ...] = ("Q4_K_M", "Q8_0"),
                  eos: str = "<|im_end|>", awq: bool = True, version: str = "1.0") -> dict[str, Path]:
    """A release folder with Name, Name-GGUF (and Name-AWQ): small files with real names. Same arguments, same
    bytes; ``shards`` changes the shard layout (names and contents), ``eos`` only the tokenizer config."""
    root = Path(root)
    folders = {MAIN: root / "Tiny-Merge", GGUF: root / "Tiny-Merge-GGUF"}
    if awq:
        folders[AWQ] = root / "Tiny-Merge-AWQ"
    for folder in folders.values():
        if folder.exists():
            for f in sorted(folder.rglob("*"), reverse=True):
                f.unlink() if f.is_file() else f.rmdir()
        folder.mkdir(parents=True, exist_ok=True)
    main = folders[MAIN]
    card = f"---\nlicense: apache-2.0\nbase_model_relation: merge\n---\n# Tiny-Merge {version}\n"
    (main / "README.md").write_text(card)
    (main / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}\n')
    (main / "tokenizer_config.json").write_text(f'{{"eos_token": "{eos}", "chat_template": "chatml"}}\n')
    (main / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}\n')
    weight = _bytes("weights", 6000)
    step = len(weight) // shards
    index = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        (main / name).write_bytes(weight[i * step:(i + 1) * step if i < shards - 1 else None])
        index[f"layer.{i}"] = name
    if shards > 1:
        (main / "model.safetensors.index.json").write_text(str(index).replace("'", '"') + "\n")
    gguf = folders[GGUF]
    (gguf / "README.md").write_text("---\nbase_model_relation: quantized\n---\n# GGUF\n")
    for q in quants:
        (gguf / f"Tiny-Merge-{q}.gguf").write_bytes(b"GGUF" + _bytes(q, 3000))
    if awq:
        a = folders[AWQ]
        (a / "README.md").write_text("---\nbase_model_relation: quantized\n---\n# AWQ\n")
        (a / "config.json").write_text('{"quantization_config": {"quant_method": "awq", "bits": 4}}\n')
        (a / "model.safetensors").write_bytes(_bytes("awq", 2500))
    return folders


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def remote_files(hub: FakeHub, repo_id: str, revision: str = "main") -> dict[str, bytes]:
    files = hub.files(repo_id, revision)
    files.pop(".gitattributes", None)  # made by the Hub with the repo
    return files


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running fake Hub; the client is pointed at it (HF_ENDPOINT), with its write token in HF_TOKEN, the LFS
    path instead of Xet, no offline mode, and an empty token store."""
    from huggingface_hub import constants

    with FakeHub(tmp_path / "hub-store") as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setenv("HF_TOKEN", fake.token)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        was_disabled = are_progress_bars_disabled()
        disable_progress_bars()
        try:
            yield fake
        finally:
            if not was_disabled:
                enable_progress_bars()
