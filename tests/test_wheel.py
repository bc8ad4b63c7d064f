"""A non-editable wheel install has the card and chat templates (shipped as the package ``releaser.templates``)."""

from __future__ import annotations

import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from releaser_testing import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_wheel_install_renders_a_card_and_a_chat_template(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("releaser-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "releaser/templates/cards/model.md.j2" in names and "releaser/templates/chat/chatml.jinja" in names
    assert "releaser/cli/__main__.py" in names and "releaser/arch/experts.py" in names   # subpackages too
    assert "releaser/imatrix/data/chat_calibration.jsonl" in names   # package data
    assert not any("testing" in n for n in names)   # the fixtures (releaser_testing.py) are not installed

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True)
    # the dependencies come from this environment; releaser itself only from the wheel (this environment's editable
    # install is not on the path: a .pth line adds a folder without running the .pth files inside it)
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    model = tiny_model(tmp_path / "model")
    tiny_tokenizer(model)
    script = textwrap.dedent(f"""
        import releaser, releaser.resources
        from releaser.card import render_card
        from releaser.tokenizer import load_template
        assert "site-packages" in releaser.__file__ and "{ROOT}" not in releaser.__file__, releaser.__file__
        print(releaser.resources.templates_dir())
        assert "<|im_start|>" in load_template("chatml").source
        card = render_card("{model}")
        assert card.startswith("---") and "## Usage" in card, card
        print("ok")
    """)
    proc = subprocess.run([str(py), "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    templates, ok = proc.stdout.split()
    assert ok == "ok" and templates.startswith(str(venv)) and templates.endswith("releaser/templates")
