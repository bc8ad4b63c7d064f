"""No two outputs of a release share a path: the repo folders, merged/, the dir: publish folder, release.json and
quality.json. A recipe whose outputs would collide is refused by ``releaser check`` and ``releaser release`` before
anything is written (``publish.repos.gguf`` equal to ``name`` once replaced the main repo)."""

from __future__ import annotations

import pytest
from safety_helpers import model, one_line_error, run  # noqa: F401 (fixture)

GGUF = "gguf: {quants: [Q8_0]}\n"
AWQ = "awq: {samples: 2, seqlen: 16}\n"
MERGE = "merge: {merge_method: linear, models: [{model: MODEL, parameters: {weight: 1}}]}\n"

CASES = {
    "gguf repo is the main repo": ("me/Tiny", GGUF + "publish: {repos: {gguf: me/Tiny}}\n",
                                   "name and publish.repos.gguf are the same path"),
    "same name, other owner": ("me/Tiny", GGUF + "publish: {repos: {gguf: you/Tiny}}\n",
                               "name and publish.repos.gguf are the same path"),
    "names differing in case": ("me/Tiny", GGUF + "publish: {repos: {gguf: me/tiny}}\n",
                                "name and publish.repos.gguf are the same path"),
    "awq repo is the gguf repo": ("me/Tiny", GGUF + AWQ + "publish: {repos: {gguf: me/Q, awq: me/Q}}\n",
                                  "publish.repos.gguf and publish.repos.awq are the same path"),
    "awq repo is the derived gguf repo": ("me/Tiny", GGUF + AWQ + "publish: {repos: {awq: me/Tiny-GGUF}}\n",
                                          "name (+ -GGUF) and publish.repos.awq are the same path"),
    "main repo named like the manifest": ("me/release.json", "", "name and the manifest release.json"),
    "main repo named like the quality report": ("me/quality.json", GGUF, "name and the quality report quality.json"),
    "main repo named like the merge output": ("me/merged", MERGE, "name and the merge's output merged"),
    "main repo named like the publish folder": ("me/published", "", "name and publish.target dir:published"),
    "main repo set to the publish folder": ("me/Tiny", "publish: {repos: {main: me/published}}\n",
                                            "publish.repos.main and publish.target dir:published"),
    "publish folder inside a repo folder": ("me/Tiny", "publish: {target: dir:Tiny/mirror}\n",
                                            "paths one inside the other"),
    "publish folder is the manifest": ("me/Tiny", "publish: {target: dir:release.json}\n",
                                       "the manifest release.json and publish.target dir:release.json"),
    "publish folder is the work folder": ("me/Tiny", "publish: {target: dir:.}\n",
                                          "is the work folder or a folder above it"),
    "publish folder above the work folder": ("me/Tiny", "publish: {target: dir:..}\n",
                                             "is the work folder or a folder above it"),
}


@pytest.mark.parametrize("name, body, problem", CASES.values(), ids=list(CASES))
def test_colliding_outputs_are_refused_before_anything_is_written(model, tmp_path, name, body, problem):
    source = "" if body.startswith("merge:") or "\nmerge:" in body else f"model: {model}\n"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: {name}\ndescription: x\nstop_audit: false\n{source}" + body.replace("MODEL", str(model)))
    for command in (["check", recipe], ["release", recipe, "-o", tmp_path / "work"]):
        code, output = run(*command)
        assert code != 0
        line = one_line_error(output)
        assert problem in line, line
        assert "give the repos different names" in line or "use a folder of its own" in line, line
    assert not (tmp_path / "work").exists()


def test_distinct_outputs_pass(model, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: me/Tiny\ndescription: x\nstop_audit: false\nmodel: {model}\n" + GGUF + AWQ
                      + "publish: {target: dir:mirror, repos: {gguf: me/Tiny-Q, awq: other/Tiny-AWQ}}\n")
    code, output = run("check", recipe)
    assert code == 0, output
