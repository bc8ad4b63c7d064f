"""The plan itself, the dir: mirror target, and `releaser publish` on the command line (incl. token hygiene)."""

from __future__ import annotations

import hashlib
import logging
import os

import pytest
from publish_helpers import AWQ, GGUF, MAIN, hub, local_files, remote_files, write_release  # noqa: F401
from typer.testing import CliRunner

from releaser.cli import app
from releaser.publish import PublishError, PublishOptions, run_publish
from releaser.publish.plan import LocalFile, RemoteFile, git_blob_sha1, plan_repo, scan_local

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


# -- the plan ----------------------------------------------------------------------------------------------------


def test_plan_compares_lfs_sha256_and_git_blob_sha1(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"\x00weights")
    (tmp_path / "config.json").write_text("{}\n")
    (tmp_path / "new.txt").write_text("new\n")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x").write_text("not part of the repo")
    (tmp_path / ".gitattributes").write_text("*.bin filter=lfs\n")
    local = scan_local(tmp_path)
    assert sorted(local) == [".gitattributes", "config.json", "new.txt", "w.safetensors"]
    assert local["config.json"].blob_sha1 == hashlib.sha1(b"blob 3\0{}\n").hexdigest()
    assert git_blob_sha1(tmp_path / "config.json") == local["config.json"].blob_sha1
    remote = {
        "w.safetensors": RemoteFile("w.safetensors", 8, sha256=hashlib.sha256(b"\x00weights").hexdigest()),
        "config.json": RemoteFile("config.json", 3, blob_sha1="0" * 40),    # same size, other content
        "old.gguf": RemoteFile("old.gguf", 10, sha256="a" * 64),
        ".gitattributes": RemoteFile(".gitattributes", 5, blob_sha1="b" * 40),
    }
    plan = plan_repo("me/x", local, remote)
    actions = {c.path: c.action for c in plan.changes}
    assert actions == {".gitattributes": "update", "config.json": "update", "new.txt": "add",
                       "old.gguf": "delete", "w.safetensors": "unchanged"}
    assert plan.bytes_to_send == 17 + 3 + 4 and not plan.empty
    kept = plan_repo("me/x", local, remote, keep_stale=True)
    assert [c.action for c in kept.changes if c.path == "old.gguf"] == ["keep"]


def test_plan_never_deletes_the_hubs_gitattributes():
    local = {"a.txt": LocalFile("a.txt", None, 1, "x")}
    remote = {"a.txt": RemoteFile("a.txt", 1, sha256="x"), ".gitattributes": RemoteFile(".gitattributes", 9,
                                                                                          blob_sha1="c" * 40)}
    plan = plan_repo("me/x", local, remote)
    assert plan.empty and [c.path for c in plan.changes] == ["a.txt"]
    assert not plan_repo("me/x", local, None).empty  # a missing repo is never "unchanged"


# -- dir: mirrors ------------------------------------------------------------------------------------------------


def mirror_files(root, repo_id):
    return local_files(root / repo_id)


def test_dir_target_mirrors_the_release_and_removes_stale_files(tmp_path):
    folders = write_release(tmp_path / "release")
    target = f"dir:{tmp_path / 'mirror'}"
    result = run_publish(PublishOptions(target=target), folders)
    for repo_id, folder in folders.items():
        assert mirror_files(tmp_path / "mirror", repo_id) == local_files(folder)
    assert {f.path for f in result.files} == {f"{r}/{p}" for r, f in folders.items() for p in local_files(f)}
    inode = os.stat(tmp_path / "mirror" / AWQ / "model.safetensors").st_ino

    again = run_publish(PublishOptions(target=target), folders)
    assert again.files == [] and "3 unchanged" in again.summary

    write_release(tmp_path / "release", shards=3, quants=("Q4_K_M",))
    result = run_publish(PublishOptions(target=target, keep_stale=True), folders)
    assert (tmp_path / "mirror" / GGUF / "Tiny-Merge-Q8_0.gguf").exists()
    result = run_publish(PublishOptions(target=target), folders)
    for repo_id, folder in folders.items():
        assert mirror_files(tmp_path / "mirror", repo_id) == local_files(folder)
    assert os.stat(tmp_path / "mirror" / AWQ / "model.safetensors").st_ino == inode  # unchanged repo untouched
    leftovers = [p.name for p in (tmp_path / "mirror" / "me").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_dir_dry_run_writes_nothing(tmp_path):
    folders = write_release(tmp_path / "release")
    result = run_publish(PublishOptions(target=f"dir:{tmp_path / 'mirror'}", dry_run=True), folders)
    assert not (tmp_path / "mirror").exists() and result.files == []
    assert "would publish" in result.summary


def test_dir_target_plans_like_the_hub(hub, tmp_path):
    folders = write_release(tmp_path / "release")
    mirror = f"dir:{tmp_path / 'mirror'}"

    def both(**options):
        on_hub = run_publish(PublishOptions(**options), folders)
        on_dir = run_publish(PublishOptions(target=mirror, **options), folders)
        for a, b in zip(on_hub.facts["repos"], on_dir.facts["repos"], strict=True):
            assert a["plan"]["changes"] == b["plan"]["changes"], a["repo_id"]
        for repo_id in folders:
            assert remote_files(hub, repo_id) == mirror_files(tmp_path / "mirror", repo_id)
        return on_hub

    both()
    both()
    write_release(tmp_path / "release", shards=1, quants=("Q8_0", "Q5_K_M"), eos="</s>")
    changed = both()
    assert {c["action"] for r in changed.facts["repos"] for c in r["plan"]["changes"]} == {
        "add", "update", "delete", "unchanged"}


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(PublishError, match="does not exist"):
        run_publish(PublishOptions(target=f"dir:{tmp_path}/m"), {MAIN: tmp_path / "nope"})
    with pytest.raises(PublishError, match="not a valid Hub repo id"):
        run_publish(PublishOptions(target=f"dir:{tmp_path}/m"), {"no-owner": tmp_path})
    with pytest.raises(ValueError, match="target must be"):
        PublishOptions(target="s3:bucket")


# -- the command line --------------------------------------------------------------------------------------------

RECIPE = """\
name: me/Tiny-Merge
description: A tiny merge.
stop_audit: false
publish:
  repos:
    gguf: me/Tiny-Merge-GGUF
    awq: me/Tiny-Merge-AWQ
releases:
  - version: "2.0"
    date: 2026-11-30
    changes: [Fixed the eos token.]
"""


def test_cli_publishes_a_release_with_a_recipe_and_never_shows_the_token(hub, tmp_path, caplog):
    folders = write_release(tmp_path / "release")
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(RECIPE)
    caplog.set_level(logging.DEBUG)
    runner = CliRunner()
    dry = runner.invoke(app, ["publish", str(tmp_path / "release"), "--recipe", str(recipe), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "dry run" in dry.output and "Tiny-Merge-Q8_0.gguf" in dry.output and not hub.repos
    result = runner.invoke(app, ["publish", str(tmp_path / "release"), "--recipe", str(recipe)])
    assert result.exit_code == 0, result.output
    for repo_id, folder in folders.items():
        assert remote_files(hub, repo_id) == local_files(folder)
        assert "v2.0" in hub.repos[repo_id].tags
    commit = hub.commit_bodies[0][0]["value"]
    assert commit["summary"] == "Release v2.0" and "Fixed the eos token." in commit["description"]
    again = runner.invoke(app, ["publish", str(tmp_path / "release"), "--recipe", str(recipe)])
    assert again.exit_code == 0 and "unchanged" in again.output

    # a failing run prints one line, without the token either
    hub.fail("POST", "/commit/", status=503, times=99, retry_after=0)
    write_release(tmp_path / "release", eos="</s>")
    failed = runner.invoke(app, ["publish", str(tmp_path / "release"), "--recipe", str(recipe)])
    assert failed.exit_code == 2 and "error: me/Tiny-Merge: giving up after 5 attempts" in failed.output

    token = hub.token
    assert token not in dry.output + result.output + again.output + failed.output
    assert token not in caplog.text and caplog.text  # the client did log its requests
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path


def test_cli_single_folder_and_errors(hub, tmp_path, monkeypatch):
    folders = write_release(tmp_path / "release", awq=False)
    runner = CliRunner()
    ok = runner.invoke(app, ["publish", str(folders[GGUF]), "--repo", GGUF, "--to", f"dir:{tmp_path / 'm'}"])
    assert ok.exit_code == 0, ok.output
    assert local_files(tmp_path / "m" / GGUF) == local_files(folders[GGUF])
    bad = runner.invoke(app, ["publish", str(tmp_path / "release"), "--to", "ftp:x", "--repo", MAIN])
    assert bad.exit_code == 2 and "error: --to: target must be 'hub' or 'dir:PATH'" in bad.output
    none = runner.invoke(app, ["publish", str(tmp_path / "release")])
    assert none.exit_code == 2 and "--recipe" in none.output
    flags = ["--repo", GGUF, "--private", "--message", "Fix eos", "--keep-stale"]
    first = runner.invoke(app, ["publish", str(folders[GGUF]), *flags])
    assert first.exit_code == 0, first.output
    assert hub.repos[GGUF].private and hub.commit_bodies[-1][0]["value"]["summary"] == "Fix eos"
    write_release(tmp_path / "release", awq=False, quants=("Q8_0",))
    kept = runner.invoke(app, ["publish", str(folders[GGUF]), *flags])
    assert kept.exit_code == 0 and set(remote_files(hub, GGUF)) == {"README.md", "Tiny-Merge-Q4_K_M.gguf",
                                                                     "Tiny-Merge-Q8_0.gguf"}
    monkeypatch.delenv("HF_TOKEN")
    missing = runner.invoke(app, ["publish", str(tmp_path / "release"), "--repo", MAIN])
    assert missing.exit_code == 2 and "error: no Hugging Face token" in missing.output
    assert "Traceback" not in missing.output


def test_failure_classification():
    import email.utils
    import time

    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    from releaser.publish.failures import auth_error, is_transient, one_line, retry_after

    def http_error(status, **headers):
        response = httpx2.Response(status, headers=headers, request=httpx2.Request("POST", "http://127.0.0.1/x"))
        return HfHubHTTPError(f"{status} Server Error\n\nfor url http://127.0.0.1/x", response=response)

    assert retry_after(http_error(429, **{"Retry-After": "12"})) == 12
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_after(http_error(503, **{"Retry-After": date})) <= 31
    assert retry_after(http_error(503)) is None
    wrapped = RuntimeError("Error while uploading 'x' to the Hub.")
    wrapped.__cause__ = http_error(503)
    assert is_transient(wrapped) and is_transient(httpx2.RemoteProtocolError("dropped"))
    assert not is_transient(http_error(404)) and not is_transient(ValueError("bad card"))
    assert "\n" not in one_line(http_error(500)) and "500" in one_line(http_error(500))
    assert "401" in str(auth_error(http_error(401), "me/x")) and "403" in str(auth_error(http_error(403), "me/x"))
    assert auth_error(http_error(500), "me/x") is None
