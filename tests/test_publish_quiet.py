"""Issue 18 item 17: `-q` hides every progress bar of `releaser publish` and of a release's publish stage, the
upload bars huggingface_hub draws itself included; without `-q` they are shown; the library never draws them."""

from __future__ import annotations

import pytest
from publish_helpers import GGUF, MAIN, hub, remote_files, write_release  # noqa: F401
from safety_helpers import run

from releaser.publish import PublishOptions, run_publish
from releaser.publish.hub import hub_progress_bars
from releaser.stage import Reporter
from releaser.cli.ui import RichReporter

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
UPLOAD_BAR = "Upload "   # huggingface_hub's "Upload N LFS files" bar


def _publish(hub, tmp_path, *flags):  # noqa: F811 - the shared fixture
    write_release(tmp_path / "release", awq=False)
    code, output = run("publish", tmp_path / "release" / "Tiny-Merge", "--repo", MAIN, *flags)
    assert code == 0, output
    assert remote_files(hub, MAIN)
    return output


def test_publish_shows_upload_bars_without_q(hub, tmp_path):  # noqa: F811
    assert UPLOAD_BAR in _publish(hub, tmp_path)


def test_publish_q_hides_upload_bars_and_progress_lines(hub, tmp_path):  # noqa: F811
    output = _publish(hub, tmp_path, "-q")
    assert UPLOAD_BAR not in output and "%|" not in output and "committing" not in output
    assert f"{MAIN}: created" in output   # the outcome is still reported


@pytest.mark.parametrize("reporter", [Reporter(), RichReporter(quiet=True)], ids=["library", "quiet"])
def test_silent_reporters_draw_no_hub_bars(hub, tmp_path, capfd, reporter):  # noqa: F811
    folders = write_release(tmp_path / "release", awq=False)
    run_publish(PublishOptions(version="1.0"), {GGUF: folders[GGUF]}, reporter)
    assert remote_files(hub, GGUF) and UPLOAD_BAR not in capfd.readouterr().err


def test_hub_bars_setting_is_restored():
    from huggingface_hub.utils import are_progress_bars_disabled

    before = are_progress_bars_disabled()
    for shown in (True, False):
        with hub_progress_bars(shown):
            assert are_progress_bars_disabled() is not shown
        assert are_progress_bars_disabled() is before
