"""A release killed inside a stage keeps the units that stage finished (``WORK/.units``, releaser.tasks): the next
run takes them instead of making them again and ends with the bytes of an uninterrupted run. In process here (the
quality stage's artefacts); tests/test_ray.py kills a Ray driver during the GGUF fan-out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from release_helpers import hashes, tiny_merge_recipe
from releaser.tasks import Task, call, kept

TYPES = ["Q8_0", "Q4_K_M", "Q6_K"]


def test_a_release_killed_in_its_quality_stage_keeps_what_it_measured(tmp_path, monkeypatch):
    from releaser.pipeline.run import run_release
    from releaser.quality import stage as quality
    from releaser_testing import tiny_chat_model

    for i, name in enumerate("ab"):
        tiny_chat_model(tmp_path / name, arch="llama", seed=i, hidden=128, intermediate=256, layers=2)
    path = tiny_merge_recipe(tmp_path, tmp_path, "Tiny-Units",
                             f"gguf: {{quants: [{', '.join(TYPES)}], pre_tokenizer: llama-bpe}}\n")
    run_release(path, tmp_path / "clean")

    measure, measured = quality.measure_unit, []

    def dies_at_the_second(options, art, *args, **kwargs):
        measured.append(art.label)
        if len(measured) == 2:
            raise KeyboardInterrupt   # the run ends here, as a kill would end it
        return measure(options, art, *args, **kwargs)

    work = tmp_path / "work"
    monkeypatch.setattr(quality, "measure_unit", dies_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        run_release(path, work)
    first = measured[0]
    assert "quality" not in json.loads((work / "release.json").read_text())["stages"]
    assert [p.parent.name for p in work.glob(".units/quality/*/*/result.json")] == [first]

    measured.clear()
    monkeypatch.setattr(quality, "measure_unit", lambda options, art, *a, **k: measured.append(art.label)
                        or measure(options, art, *a, **k))
    run_release(path, work)
    assert first not in measured and len(measured) == len(TYPES) - 1   # the first one's figures were kept
    assert hashes(work) == hashes(tmp_path / "clean")
    assert not (work / ".units").exists()


def unit_figures(keep: str, *, reporter=None):
    """A unit that writes a file and returns figures (a dataclass)."""
    from releaser.quality.metrics import Figures

    Path(keep).mkdir(parents=True, exist_ok=True)
    (Path(keep) / "out.bin").write_bytes(b"x" * 16)
    return Figures(ppl=12.5, tokens=100, windows=2, kld_mean=0.01)


def test_a_kept_result_is_taken_only_whole(tmp_path):
    """A unit's kept result is taken only with every file it wrote at its size, and builds only releaser's classes."""
    keep = tmp_path / "unit"
    task = Task("figures", "test_units:unit_figures", (str(keep),), keep=str(keep))
    assert kept(task) is None
    value = call(task, reporter=None)
    again = kept(task)
    assert again is not None and again.kept and again.value == value   # a Figures dataclass, rebuilt
    (keep / "out.bin").write_bytes(b"shorter")
    assert kept(task) is None
    (keep / "out.bin").write_bytes(b"x" * 16)
    result = json.loads((keep / "result.json").read_text())
    result["value"]["__dataclass__"] = "subprocess:Popen"
    (keep / "result.json").write_text(json.dumps(result))
    assert kept(task) is None
