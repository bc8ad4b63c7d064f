"""Repo ids are validated as the Hub does wherever one enters: the recipe's name and publish.repos, and --repo of
releaser publish. A bad id is a one-line error naming it and the fix, and nothing is written."""

from __future__ import annotations

import pytest
from safety_helpers import model, one_line_error, run  # noqa: F401 (fixture)

from releaser.options import repo_id_problem

BAD = {
    "probe/.": "'.' is not a name",
    "probe/..": "'..' is not a name",
    "probe/Tiny\n": "control character",
    "probe/Tiny\t": "control character",
    "probe/-Tiny": "starts or ends with '-' or '.'",
    "probe/Tiny.": "starts or ends with '-' or '.'",
    ".probe/Tiny": "starts or ends with '-' or '.'",
    "probe/Ti--ny": "'--' or '..'",
    "probe/Ti..ny": "'--' or '..'",
    "probe/Tiny.git": "'.git'",
    "probe/" + "x" * 97: "the name has 97 characters, the Hub allows 96",
    "Tiny": "exactly one '/'",
    "probe/a/b": "exactly one '/'",
    "probe/": "cannot be empty",
    "probe/Tïny": "'ï' is not allowed",
    "probe/Ti ny": "' ' is not allowed",
}
GOOD = ["me/Tiny", "me/Tiny-Merge_1.5B", "a/b", "me/" + "x" * 96, "Org-1/x.y_z"]


@pytest.mark.parametrize("value", GOOD)
def test_hub_ids_pass(value):
    assert repo_id_problem(value) is None


@pytest.mark.parametrize("value, why", BAD.items())
def test_bad_ids_are_named(value, why):
    assert why in repo_id_problem(value)


def _yaml(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace('"', '\\"') + '"'


@pytest.mark.parametrize("key", ["name", "publish.repos.main", "publish.repos.gguf", "publish.repos.awq"])
@pytest.mark.parametrize("value", list(BAD))
def test_recipe_ids_are_refused_by_check_and_release(model, tmp_path, key, value):
    repos = {"publish.repos.main": "main", "publish.repos.gguf": "gguf", "publish.repos.awq": "awq"}
    body = f"description: x\nstop_audit: false\nmodel: {model}\n"
    if key == "name":
        body = f"name: {_yaml(value)}\n" + body
    else:
        body = "name: me/Tiny\n" + body + f"publish: {{repos: {{{repos[key]}: {_yaml(value)}}}}}\n"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(body)
    for command in (["check", recipe], ["release", recipe, "-o", tmp_path / "work"]):
        code, output = run(*command)
        assert code != 0
        line = one_line_error(output)
        assert f"{key}: {value!r} is not a valid Hub repo id" in line and "write OWNER/NAME" in line, line
    assert not (tmp_path / "work").exists()


def test_a_derived_quant_id_over_the_limit_names_name(model, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: me/{'x' * 94}\ndescription: x\nstop_audit: false\nmodel: {model}\ngguf: {{quants: [Q8_0]}}\n")
    code, output = run("check", recipe)
    assert code != 0
    assert "the gguf repo id made from it" in one_line_error(output)
    assert "shorten name or set publish.repos.gguf" in one_line_error(output)


@pytest.mark.parametrize("value", ["probe/.", "probe/..", "probe/Tiny\n", "probe"])
def test_publish_repo_flag_is_validated_before_anything_is_written(tmp_path, value):
    """``publish --repo probe/.`` once replaced the owner's folder (every other mirror of that owner) under the
    target; now it is refused and the target is untouched."""
    folder = tmp_path / "Tiny"
    folder.mkdir()
    (folder / "README.md").write_text("# Tiny\n")
    mirror = tmp_path / "mirror" / "probe" / "Other"
    mirror.mkdir(parents=True)
    (mirror / "keep.txt").write_text("another repo's file\n")
    code, output = run("publish", folder, "--repo", value, "--to", f"dir:{tmp_path / 'mirror'}")
    assert code != 0
    line = one_line_error(output)
    assert "--repo:" in line and "is not a valid Hub repo id" in line, line
    assert (mirror / "keep.txt").read_text() == "another repo's file\n"
    assert sorted(p.name for p in (tmp_path / "mirror").rglob("*")) == ["Other", "keep.txt", "probe"]


def test_library_publish_validates_ids_too(tmp_path):
    from releaser.publish import PublishOptions, run_publish
    from releaser.publish.options import PublishError

    folder = tmp_path / "Tiny"
    folder.mkdir()
    (folder / "README.md").write_text("# Tiny\n")
    with pytest.raises(PublishError, match="is not a valid Hub repo id"):
        run_publish(PublishOptions(target=f"dir:{tmp_path / 'mirror'}"), {"probe/.": folder})
    assert not (tmp_path / "mirror").exists()
