"""The release as a graph: ``AFTER`` (each stage's prerequisites, what ``--executor ray`` waits for before it starts a
stage) covers every stage entry and stage folder a stage reads, watched through the manifest while each stage's
applies, depends and call run against a recipe with every section; and the terminal reporter takes messages and
progress bars from several threads at once. The Ray runs themselves are in test_ray.py."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pytest

from releaser.pipeline.manifest import Manifest

STAGES = ("merge", "tokenizer", "verify", "imatrix", "gguf", "runtimes", "awq", "w4a16", "mlx", "quality", "cards",
          "publish")


class Watching(Manifest):
    """A manifest that notes which stages' entries and folders are read (``read``), holding a made-up entry for every
    stage. A stage left out of the run (--skip) is read too (``Release._made``), but never changes during a run: the
    watched release leaves nothing out."""

    folders: dict[Path, str] = {}
    read: set[str]

    def stage(self, name: str) -> dict | None:
        self.read.add(name)
        return super().stage(name)

    def recorded(self, folder: Path) -> dict[str, dict]:
        self.read.update(self.data["stages"])
        return super().recorded(folder)

    def hash(self, path: Path) -> str:
        path = Path(path).absolute()
        self.read.update(stage for folder, stage in self.folders.items() if path == folder or path.is_relative_to(folder))
        return super().hash(path)


def unread_prerequisites(r, after: dict[str, tuple[str, ...]]) -> dict[str, set[str]]:
    """Stage -> the stages it read without waiting for them, directly or through its prerequisites' prerequisites
    (empty when ``after`` covers every read)."""
    from releaser.pipeline.stages import STEPS

    def before(name: str) -> set[str]:
        return {p for q in after[name] for p in {q, *before(q)}}

    missing = {}
    for step in STEPS:
        r.manifest.read = set()
        assert step.applies(r) is None, (step.name, step.applies(r))
        step.depends(r)
        step.call(r)
        wrong = r.manifest.read - before(step.name) - {step.name}
        if wrong:
            missing[step.name] = wrong
    return missing


@pytest.fixture(scope="module", params=["awq", "rtn"])
def release(request, tmp_path_factory):
    """A release with every stage (merge, stop audit, imatrix auto, GGUF, runtimes, AWQ in two formats, MLX from the
    AWQ codes or rounded from the main folder, quality, cards, publish to a folder) and a manifest with an entry for
    each, as a run left it."""
    from releaser.pipeline.run import open_release
    from releaser_testing import tiny_chat_model

    root = tmp_path_factory.mktemp(f"graph-{request.param}")
    for i, name in enumerate("ab"):
        tiny_chat_model(root / name, arch="llama", seed=i, hidden=64, intermediate=128, layers=2)
    (root / "r.yaml").write_text(f"""name: me/Tiny-Graph
description: Every stage.
merge:
  merge_method: linear
  models:
    - {{model: {root / 'a'}, parameters: {{weight: 0.5}}}}
    - {{model: {root / 'b'}, parameters: {{weight: 0.5}}}}
tokenizer: {{template: chatml}}
stop_audit: {{samples: 2}}
gguf: {{quants: [Q8_0], imatrix: auto}}
awq: {{formats: [autoawq, compressed-tensors]}}
mlx: {{source: {request.param}}}
quality: {{ctx: 64, chunks: 2}}
publish: {{target: dir:published}}
""")
    r = open_release(root / "r.yaml", root / "work")
    r.manifest = Watching(r.manifest.path, r.manifest.data)
    r.manifest.read = set()
    for stage in STAGES:
        r.manifest.data["stages"][stage] = {"files": [], "root": ".", "depends": {"weights": ""}, "summary": "",
                                            "facts": {}}
    r.imatrix_dir.mkdir(parents=True)
    from releaser.imatrix.stage import file_name

    (r.imatrix_dir / file_name("Tiny-Graph")).write_bytes(b"an importance matrix")
    Watching.folders = {r.merged_dir: "merge", r.main_dir: "tokenizer", r.imatrix_dir: "imatrix", r.gguf_dir: "gguf",
                        r.awq_dir: "awq", r.w4a16_dir: "w4a16", r.mlx_dir: "mlx", r.quality_report: "quality"}
    assert r.recipe.mlx_source == request.param
    return r


def test_every_stage_waits_for_the_stages_it_reads(release):
    from releaser.pipeline.stages import AFTER, NAMES

    assert tuple(NAMES) == STAGES
    assert unread_prerequisites(release, AFTER) == {}
    # the gate before publishing checks every stage's files and facts (verify's audit, quality's figures)
    assert set(AFTER["publish"]) == set(STAGES) - {"publish"}


def test_a_read_without_its_prerequisite_is_found(release):
    """The check can fail: quality without gguf among its prerequisites (no other prerequisite of it waits for gguf),
    gguf without imatrix (the importance matrix file, read by its bytes, not through a manifest entry)."""
    from releaser.pipeline.stages import AFTER

    after = {**AFTER, "quality": tuple(p for p in AFTER["quality"] if p != "gguf"),
             "gguf": tuple(p for p in AFTER["gguf"] if p != "imatrix")}
    assert unread_prerequisites(release, after) == {"quality": {"gguf"}, "gguf": {"imatrix"}}


def test_the_terminal_reporter_takes_bars_and_messages_from_several_threads():
    """Stages side by side (Ray) each open a progress bar from their own driver thread: one live display holds them
    all (rich refuses a second one), messages print above it, and it ends with the last bar."""
    from rich.console import Console

    from releaser.cli.ui import RichReporter

    stream = io.StringIO()
    reporter = RichReporter(Console(file=stream, force_terminal=True, width=100))
    errors, start = [], threading.Barrier(4)

    def stage(i: int) -> None:
        try:
            start.wait()
            with reporter.progress(f"stage {i}", 20) as advance:
                for j in range(20):
                    advance(1, description=f"stage {i}: unit {j}")
                    reporter.message(f"stage {i}: unit {j} done")
                    with reporter.progress(f"stage {i} unit {j}", 1) as inner:   # nested, as a stage's own bar
                        inner()
        except BaseException as exc:   # noqa: BLE001 - the test's failure
            errors.append(exc)

    threads = [threading.Thread(target=stage, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert reporter._bar is None and reporter._open == 0
    text = stream.getvalue()
    assert all(f"stage {i}: unit 19 done" in text for i in range(4))


def test_a_bar_that_outlives_the_first_one_is_still_drawn():
    """Two stages' bars end in any order: the one still open goes on being drawn after the first one ended (with a
    live display per bar, rich 13 refuses the second one, and rich 15's nested displays stop drawing with the
    first)."""
    import time

    from rich.console import Console

    from releaser.cli.ui import RichReporter

    stream = io.StringIO()
    reporter = RichReporter(Console(file=stream, force_terminal=True, width=100))
    first, second = reporter.progress("gguf: 3 Ray task(s)", 3), reporter.progress("awq: 1 Ray task(s)", 1)
    first.__enter__()
    advance = second.__enter__()
    first.__exit__(None, None, None)
    advance(0, description="awq: still running")
    time.sleep(0.5)   # rich draws ten times a second
    second.__exit__(None, None, None)
    assert "awq: still running" in stream.getvalue()
