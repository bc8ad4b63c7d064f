"""What the format writers share: the tokenizer and generation files copied beside the weights."""

from __future__ import annotations

import shutil
from pathlib import Path

SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
              "chat_template.json")


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy ``src``'s tokenizer and generation files into ``dst``; the names copied."""
    names = [n for n in SIDE_FILES if (src / n).is_file()]
    for name in names:
        shutil.copyfile(src / name, dst / name)
    return names
