"""Publishing to a Hub: the real huggingface_hub client against our fake Hub (tests/fakehub.py) on 127.0.0.1."""

from __future__ import annotations

import json

import pytest
from publish_helpers import AWQ, GGUF, MAIN, WEIGHTS, hub, local_files, remote_files, write_release  # noqa: F401

from releaser.publish import PublishError, PublishOptions, run_publish
from releaser.stage import Reporter

# huggingface_hub's own LFS PUT passes a file object as data=
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


class Recorder(Reporter):
    def __init__(self):
        self.messages, self.warnings = [], []

    def message(self, text):
        self.messages.append(text)

    def warning(self, text):
        self.warnings.append(text)


class Sleeps(list):
    def __call__(self, seconds):
        self.append(seconds)


def publish(folders, **options):
    sleeps, rec = Sleeps(), Recorder()
    result = run_publish(PublishOptions(**{"version": "1.0", **options}), folders, rec, sleep=sleeps)
    return result, rec, sleeps


def repo_fact(result, repo_id):
    return next(r for r in result.facts["repos"] if r["repo_id"] == repo_id)


def assert_published(hub, folders):
    for repo_id, folder in folders.items():
        assert remote_files(hub, repo_id) == local_files(folder), repo_id


def test_first_publish_equals_folders_byte_for_byte(hub, tmp_path):
    folders = write_release(tmp_path / "release")
    result, rec, _ = publish(folders)
    assert_published(hub, folders)
    assert hub.commits == 3
    commits = [r.path for r in hub.requests if "/commit/" in r.path]
    assert commits == [f"/api/models/{r}/commit/main" for r in (MAIN, GGUF, AWQ)]  # main repo first
    for repo_id in folders:
        assert hub.repos[repo_id].tags["v1.0"] == hub.repos[repo_id].branches["main"]
        fact = repo_fact(result, repo_id)
        assert fact["created"] and fact["commit"] and fact["applied"] and fact["tag"] == "v1.0"
        assert fact["plan"]["counts"]["add"] == len(local_files(folders[repo_id]))
        assert not hub.repos[repo_id].private
    assert hub.lfs_bytes == sum(len(b) for f in folders.values() for p, b in local_files(f).items()
                                if p.endswith(WEIGHTS))
    assert hub.inline_bytes(WEIGHTS) == 0
    assert {f.path for f in result.files} == {f"{r}/{p}" for r, f in folders.items() for p in local_files(f)}
    assert "3 changed" in result.summary and "3 created" in result.summary
    json.dumps(result.facts)  # serialisable, for the release manifest


def test_same_release_again_costs_only_metadata_requests(hub, tmp_path):
    folders = write_release(tmp_path / "release")
    publish(folders)
    hub.reset_counts()
    result, _, _ = publish(folders)
    assert hub.commits == 0 and hub.lfs_bytes == 0 and hub.inline_bytes() == 0
    # per repo: the head (repo_info), its tree, and the refs (is the tag there?): three GETs, nothing written
    assert [r.method for r in hub.requests] == ["GET"] * 9
    assert len(hub.requests) == 3 * len(folders)
    assert all(repo_fact(result, r)["commit"] is None and not repo_fact(result, r)["applied"] for r in folders)
    assert result.files == [] and "0 changed" in result.summary and "3 unchanged" in result.summary


def test_files_are_hashed_only_when_compared_and_once(hub, tmp_path, monkeypatch):
    import releaser.publish.plan as plan_module

    hashed = []
    real = plan_module.sha256_file
    monkeypatch.setattr(plan_module, "sha256_file", lambda path: hashed.append(path) or real(path))
    folders = write_release(tmp_path / "release")
    publish(folders)
    assert hashed == []  # new paths need no comparison; the client's own hash of each upload is reused
    publish(folders)
    lfs = sorted(str(f / p) for f in folders.values() for p in local_files(f) if p.endswith(WEIGHTS))
    assert sorted(map(str, hashed)) == lfs  # regular files compare by git blob sha1, LFS files by sha256, once


def test_tokenizer_fix_sends_only_the_changed_file(hub, tmp_path):
    folders = write_release(tmp_path / "release")
    publish(folders)
    hub.reset_counts()
    write_release(tmp_path / "release", eos="<|endoftext|>")
    result, _, _ = publish(folders)
    assert hub.commits == 1 and hub.lfs_bytes == 0
    [body] = hub.commit_bodies
    assert [line["value"]["path"] for line in body[1:]] == ["tokenizer_config.json"]
    assert repo_fact(result, MAIN)["plan"]["counts"] == {"add": 0, "update": 1, "delete": 0, "keep": 0,
                                                         "unchanged": 6}
    assert_published(hub, folders)
    # the tag of this version already names the first commit: left alone, with a warning
    assert hub.repos[MAIN].tags["v1.0"] != hub.repos[MAIN].branches["main"]


def test_shard_size_change_deletes_the_old_shards(hub, tmp_path):
    folders = write_release(tmp_path / "release", shards=2)
    publish(folders)
    hub.reset_counts()
    write_release(tmp_path / "release", shards=3)
    result, _, _ = publish(folders, version="1.1")
    assert_published(hub, folders)
    plan = repo_fact(result, MAIN)["plan"]
    deleted = {c["path"] for c in plan["changes"] if c["action"] == "delete"}
    assert deleted == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert hub.commits == 1
    assert hub.repos[MAIN].tags["v1.1"] == hub.repos[MAIN].branches["main"]


def test_dropped_quant_is_deleted_or_kept_with_keep_stale(hub, tmp_path):
    folders = write_release(tmp_path / "release", quants=("Q4_K_M", "Q8_0"))
    publish(folders)
    write_release(tmp_path / "release", quants=("Q4_K_M",))
    result, _, _ = publish(folders, keep_stale=True)
    assert "Tiny-Merge-Q8_0.gguf" in remote_files(hub, GGUF)
    assert repo_fact(result, GGUF)["plan"]["counts"]["keep"] == 1 and hub.commits == 3
    result, _, _ = publish(folders)
    assert_published(hub, folders)
    assert [c["path"] for c in repo_fact(result, GGUF)["plan"]["changes"] if c["action"] == "delete"] == [
        "Tiny-Merge-Q8_0.gguf"]


def test_dry_run_sends_nothing(hub, tmp_path):
    folders = write_release(tmp_path / "release")
    result, _, _ = publish(folders, dry_run=True)
    assert {r.method for r in hub.requests} == {"GET"} and not hub.repos
    assert all(not repo_fact(result, r)["plan"]["exists"] for r in folders)
    assert "would publish" in result.summary and "3 to create" in result.summary
    publish(folders)
    write_release(tmp_path / "release", shards=3)
    hub.reset_counts()
    result, _, _ = publish(folders, dry_run=True)
    assert {r.method for r in hub.requests} == {"GET"} and hub.commits == 0
    assert repo_fact(result, MAIN)["plan"]["counts"]["delete"] == 2


def test_private_and_pull_request(hub, tmp_path):
    folders = write_release(tmp_path / "release", awq=False)
    publish(folders, private=True)
    assert hub.repos[MAIN].private and hub.repos[GGUF].private
    main_head = hub.repos[MAIN].branches["main"]
    write_release(tmp_path / "release", awq=False, eos="<|endoftext|>")
    result, _, _ = publish(folders, create_pr=True, version="1.1")
    fact = repo_fact(result, MAIN)
    assert fact["pr_url"].endswith(f"/{MAIN}/discussions/1") and fact["tag"] is None
    assert hub.repos[MAIN].branches["main"] == main_head  # main untouched
    assert remote_files(hub, MAIN, "refs/pr/1") == local_files(folders[MAIN])
    assert "v1.1" not in hub.repos[MAIN].tags
    assert repo_fact(result, GGUF)["pr_url"] is None  # unchanged repo: no PR
    # the same again: the open PR already has the changes, no second PR
    hub.reset_counts()
    result, _, _ = publish(folders, create_pr=True, version="1.1")
    assert repo_fact(result, MAIN)["pr_url"] == fact["pr_url"] and len(hub.repos[MAIN].prs) == 1
    assert hub.commits == 0


def test_pull_request_commit_retried_on_its_branch(hub, tmp_path):
    folders = write_release(tmp_path / "release", awq=False)
    publish(folders)
    write_release(tmp_path / "release", awq=False, shards=3)
    hub.fail("POST", f"/api/models/{MAIN}/commit/", status=500, after=True)
    result, _, sleeps = publish(folders, create_pr=True)
    fact = repo_fact(result, MAIN)
    assert fact["landed_earlier"] and len(hub.repos[MAIN].prs) == 1 and len(sleeps) == 1
    assert remote_files(hub, MAIN, "refs/pr/1") == local_files(folders[MAIN])


# -- faults ------------------------------------------------------------------------------------------------------


def test_503_on_commit_is_retried_after_replanning(hub, tmp_path):
    folders = write_release(tmp_path / "release")
    hub.fail("POST", f"/api/models/{MAIN}/commit/", status=503, times=2)
    result, rec, sleeps = publish(folders)
    assert_published(hub, folders)
    assert sleeps == [1.0, 2.0] and repo_fact(result, MAIN)["attempts"] == 3
    assert sum("503" in w for w in rec.warnings) == 2
    # the LFS objects went up once: the retries found them on the server
    assert hub.lfs_bytes == sum(len(b) for f in folders.values() for p, b in local_files(f).items()
                                if p.endswith(WEIGHTS))


def test_429_waits_as_told_and_reports_the_wait(hub, tmp_path):
    folders = write_release(tmp_path / "release", awq=False)
    hub.fail("POST", f"/api/models/{GGUF}/commit/", status=429, retry_after=7)
    result, rec, sleeps = publish(folders)
    assert_published(hub, folders)
    assert sleeps == [7.0]
    assert any("429" in w and "waiting 7 s" in w for w in rec.warnings)


def test_429_longer_than_max_wait_is_a_one_line_error(hub, tmp_path):
    folders = write_release(tmp_path / "release", awq=False)
    hub.fail("POST", f"/api/models/{MAIN}/commit/", status=429, retry_after=3600)
    with pytest.raises(PublishError, match=r"rate limited by the Hub \(429\).*retry after 3600 s") as err:
        publish(folders)
    assert "\n" not in str(err.value)
    publish(folders)  # a second run converges
    assert_published(hub, folders)


def test_dropped_connection_during_lfs_upload(hub, tmp_path):
    folders = write_release(tmp_path / "release", awq=False)
    fault = hub.fail("PUT", "/lfs-upload/", drop=True)
    publish(folders)
    assert fault.hits == 1
    assert_published(hub, folders)


def test_500_after_the_commit_landed_makes_no_second_commit(hub, tmp_path):
    folders = write_release(tmp_path / "release", awq=False)
    hub.fail("POST", f"/api/models/{MAIN}/commit/", status=500, after=True)
    result, rec, sleeps = publish(folders)
    assert_published(hub, folders)
    fact = repo_fact(result, MAIN)
    assert fact["landed_earlier"] and fact["attempts"] == 2 and fact["tag"] == "v1.0"
    assert len(hub.repos[MAIN].commits) == 2  # the repo's initial commit and ours, not a duplicate
    assert len(sleeps) == 1


def test_persistent_failure_is_one_line_and_a_second_run_converges(hub, tmp_path):
    folders = write_release(tmp_path / "release")
    hub.fail("POST", f"/api/models/{GGUF}/commit/", status=503, times=5)
    with pytest.raises(PublishError, match=f"{GGUF}: giving up after 5 attempts") as err:
        publish(folders)
    assert "\n" not in str(err.value)
    assert_published(hub, {MAIN: folders[MAIN]})  # the main repo went first and is complete
    sent = hub.lfs_bytes
    hub.reset_counts()
    result, _, _ = publish(folders)
    assert_published(hub, folders)
    assert hub.lfs_bytes == len(local_files(folders[AWQ])["model.safetensors"])  # the GGUFs were not sent again
    assert sent > 0 and repo_fact(result, MAIN)["commit"] is None


def test_token_missing_rejected_or_read_only(hub, tmp_path, monkeypatch):
    folders = write_release(tmp_path / "release", awq=False)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PublishError, match="no Hugging Face token: set HF_TOKEN or run `hf auth login`"):
        publish(folders)
    assert not hub.requests
    monkeypatch.setenv("HF_TOKEN", "hf_notAValidToken")
    with pytest.raises(PublishError, match=r"rejected the token \(401\)"):
        publish(folders)
    monkeypatch.setenv("HF_TOKEN", hub.read_token)
    with pytest.raises(PublishError, match=r"no write access to me/Tiny-Merge \(403\)"):
        publish(folders)
    assert not hub.repos


def test_stored_login_is_used(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    folders = write_release(tmp_path / "release", awq=False)
    monkeypatch.delenv("HF_TOKEN")
    token_file = tmp_path / "hf-home" / "token"
    token_file.parent.mkdir(parents=True)
    token_file.write_text(hub.token)
    assert constants.HF_TOKEN_PATH == str(token_file)
    publish(folders)
    assert_published(hub, folders)


def test_offline_mode_is_a_clear_error(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE is set"):
        publish(write_release(tmp_path / "release"))


def test_paged_tree_listing(hub, tmp_path):
    hub.page_size = 2
    folders = write_release(tmp_path / "release")
    publish(folders)
    hub.reset_counts()
    publish(folders)
    assert hub.commits == 0
    assert sum("/tree/" in r.path for r in hub.requests) > 3  # followed the Link pages


def test_collection_gets_the_release_repos_once(hub, tmp_path):
    folders = write_release(tmp_path / "release")
    result, rec, _ = publish(folders, collection="Tiny Merge release")
    [(slug, collection)] = hub.collections.items()
    assert slug.startswith("me/tiny-merge-release-") and collection["items"] == [MAIN, GGUF, AWQ]
    assert result.facts["collection"] == {"slug": slug, "added": [MAIN, GGUF, AWQ]}
    result, _, _ = publish(folders, collection="Tiny Merge release")
    assert len(hub.collections) == 1 and collection["items"] == [MAIN, GGUF, AWQ]
    assert result.facts["collection"]["added"] == []


def test_a_refused_commit_is_not_retried(hub, tmp_path):
    folders = write_release(tmp_path / "release", awq=False)
    hub.fail("POST", f"/api/models/{MAIN}/commit/", status=422)
    with pytest.raises(PublishError, match=f"^{MAIN}: .*422") as err:
        publish(folders)
    assert "\n" not in str(err.value) and hub.commits == 0


def test_branch_moved_since_the_plan_is_replanned(hub, tmp_path):
    folders = write_release(tmp_path / "release", awq=False)
    publish(folders)
    write_release(tmp_path / "release", awq=False, eos="</s>")
    # someone else commits to main between our plan and our commit: the server answers 412 to our parent_commit

    def concurrent_commit(repo):
        tree = dict(repo.commits[repo.branches["main"]]["tree"])
        tree["notes.txt"] = hub._store_blob(b"added by someone else\n")
        hub._new_commit(repo, "main", tree, "concurrent edit")

    hub.before_commit = concurrent_commit
    # the first commit attempt sees main moved (412), re-plans (notes.txt is now stale) and commits again
    result, rec, sleeps = publish(folders)
    fact = repo_fact(result, MAIN)
    assert fact["attempts"] == 2 and any("412" in w for w in rec.warnings)
    assert remote_files(hub, MAIN) == local_files(folders[MAIN])  # notes.txt was stale in the new plan: deleted
