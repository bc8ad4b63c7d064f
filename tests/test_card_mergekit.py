"""Cards for folders made by other tools: a merge written by mergekit 0.1.5 (run here) and the real SmolLM2 folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from releaser.card import render_card
from releaser_testing import tiny_model, tiny_tokenizer


@pytest.mark.slow
def test_card_for_a_mergekit_folder(tmp_path):
    a = tiny_tokenizer(tiny_model(tmp_path / "model-a", seed=1))
    b = tiny_tokenizer(tiny_model(tmp_path / "model-b", seed=2))
    config = tmp_path / "merge.yml"
    config.write_text(f"""\
merge_method: slerp
base_model: {a}
models:
  - model: {a}
  - model: {b}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - value: 0.5
dtype: float32
""")
    out = tmp_path / "merged"
    exe = Path(sys.executable).with_name("mergekit-yaml")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([str(exe), str(config), str(out), "--lazy-unpickle"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = (out / "mergekit_config.yml").read_text()
    assert yaml.safe_load(written)["merge_method"] == "slerp"

    text = render_card(out)
    assert "# merged\n" in text
    assert "merged with the [SLERP](" in text and f"using `{a.name}` as the base model" in text
    assert f"- `{b.name}`\n" in text and str(tmp_path) not in text   # local paths by folder name only
    shown = written.replace(str(a), a.name).replace(str(b), b.name)
    assert "```yaml\n" + shown.rstrip("\n") + "\n```" in text
    data = ModelCard(text).data.to_dict()
    assert data["tags"] == ["merge", "mergekit"] and data["library_name"] == "transformers"
    assert "base_model" not in data and "base_model_relation" not in data  # local inputs are not Hub repos
    assert "<|im_start|>user\n{prompt}<|im_end|>" in text  # mergekit copied the base model's tokenizer


@pytest.mark.slow
def test_card_for_smollm2(smollm2, tmp_path):
    folder = tmp_path / "SmolLM2-135M-Instruct"
    folder.mkdir()
    for f in smollm2.iterdir():
        (folder / f.name).symlink_to(f)
    text = render_card(folder)
    assert "| Parameters | 135M |" in text and "| Architecture | LlamaForCausalLM |" in text
    assert "Stop token: `<|im_end|>`" in text
    assert "<|im_start|>system\n{system_prompt}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>" in text
    assert "## Merge details" not in text and "## License" not in text
    shutil.rmtree(folder)
