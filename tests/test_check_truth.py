"""``releaser check`` tells the truth: whatever ``releaser release`` refuses before its first stage, ``check`` refuses
too, with the same one line, offline, and neither writes anything. Each case is a recipe that used to pass ``check``
and fail in ``release`` (some mid-run, after the merge)."""

from __future__ import annotations

import pytest
import yaml
from safety_helpers import one_line_error as _one_line, run as _run

from releaser_testing import noised_variant, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("truth")
    a = tiny_model(root / "a", vocab=256)
    tiny_tokenizer(a)
    b = noised_variant(a, root / "b", seed=1)
    return str(a), str(b)


def merge_recipe(models) -> dict:
    a, b = models
    return {"name": "probe/Tiny", "description": "A tiny release.", "stop_audit": False,
            "merge": {"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": b}],
                      "parameters": {"t": 0.5}, "dtype": "float32"},
            "gguf": {"quants": ["Q8_0"]}, "quality": False}


def model_recipe(models) -> dict:
    return {"name": "probe/Tiny", "description": "A tiny release.", "stop_audit": False, "model": models[0], "gguf": {"quants": ["Q8_0"]}}


def _set(path: str, value):
    def change(recipe: dict, tmp_path) -> None:
        *parents, last = path.split(".")
        node = recipe
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if callable(value):
            node[last] = value(tmp_path)
        else:
            node[last] = value
    return change


def _bad_template(tmp_path):
    (tmp_path / "card.jinja").write_text("# {{ title }}\n{% if %}\n")
    return "card.jinja"


def _model_without_layer_count(tmp_path):
    import json

    folder = tiny_model(tmp_path / "nolayers")
    config = json.loads((folder / "config.json").read_text())
    del config["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def _junk_imatrix(tmp_path):
    (tmp_path / "junk.dat").write_bytes(b"\x05\x00\x00\x00junk")
    return "junk.dat"


def _phi3_model(tmp_path):
    from releaser_testing import tiny_family_model

    return str(tiny_family_model(tmp_path / "phi3", "phi3", vocab=256))


def _phi3_with_awq(recipe: dict, tmp_path) -> None:
    """A Phi-3 model with an AWQ section (the test takes AWQ away from Phi-3: every family has every stage now)."""
    recipe["model"], recipe["awq"] = _phi3_model(tmp_path), {}


def _without_awq(monkeypatch, label: str) -> None:
    import dataclasses

    import releaser.arch as registry
    import releaser.pipeline.run as pipeline

    families = [dataclasses.replace(a, stages=tuple(s for s in a.stages if s != "awq")) if a.label == label else a
                for a in registry.FAMILIES]
    monkeypatch.setattr(registry, "FAMILIES", families)
    monkeypatch.setattr(pipeline, "FAMILIES", families)


CASES = {   # id -> (recipe maker, change, what the one line must name)
    "unknown merge method": (merge_recipe, _set("merge.merge_method", "slurp"), "slurp"),
    "nan t": (merge_recipe, _set("merge.parameters.t", float("nan")), "finite"),
    "nan in a gradient": (merge_recipe, _set("merge.parameters.t", [0.0, float("nan")]), "finite"),
    "t not a number": (merge_recipe, _set("merge.parameters.t", [0.0, "half"]), "`t`"),
    "misspelt parameter": (merge_recipe, _set("merge.parameters.lamda", 0.5), "lamda"),
    "infinite weight": (merge_recipe, _set("merge.models.1.parameters", {"weight": float("inf")}), "finite"),
    "tpu device": (merge_recipe, _set("merge.device", "tpu"), "tpu"),
    "shard size abc": (merge_recipe, _set("merge.shard_size", "abc"), "abc"),
    "shard size inf": (merge_recipe, _set("merge.shard_size", "inf"), "inf"),
    "missing model folder": (merge_recipe, _set("merge.models.1.model", "./no-such-model"), "no-such-model"),
    "missing model: folder": (model_recipe, _set("model", "./no-such-model"), "no-such-model"),
    "model: config without a layer count": (model_recipe, _set("model", _model_without_layer_count),
                                             "has no num_hidden_layers"),
    "slerp of three models": (merge_recipe, _set("merge.models.2", {"model": "."}), "slerp"),
    "card template syntax": (model_recipe, _set("card.template", _bad_template), "card.jinja"),
    "card template missing": (model_recipe, _set("card.template", "nope.jinja"), "nope.jinja"),
    "negative split size": (model_recipe, _set("gguf.split_max_size", "-5G"), "-5G"),
    "name of 306 characters": (model_recipe, _set("name", "probe/" + "x" * 300), "characters"),
    "nan KLD limit": (model_recipe, _set("quality.max_kld", {"Q8_0": float("nan")}), "finite"),
    "negative KLD limit": (model_recipe, _set("quality.max_kld", {"Q8_0": -0.1}), "negative"),
    "unknown quant in max_kld": (model_recipe, _set("quality.max_kld", {"Q8_O": 0.1}), "Q8_O"),
    "a stage the family lacks": (model_recipe, _phi3_with_awq, "remove the recipe's awq section"),
    "infinite time budget": (model_recipe, _set("quality.time_budget", float("inf")), "finite"),
    "tensor type pattern": (model_recipe, _set("gguf.tensor_types", {"attn_v[": "q8_0"}), "attn_v["),
    "unknown tensor type": (model_recipe, _set("gguf.output_type", "q7_0"), "q7_0"),
    "custom quant without base": (model_recipe, _set("gguf.quants", ["Q8_0", {"name": "Q4_K_L", "base": "Q4_K_Q",
                                                                             "output_type": "q8_0"}]), "Q4_K_Q"),
    "two quants of one name": (model_recipe, _set("gguf.quants", ["Q8_0", {"name": "Q8_0", "pure": True}]), "Q8_0"),
    "missing imatrix": (model_recipe, _set("gguf.imatrix", "no-such.imatrix.gguf"), "no-such.imatrix.gguf"),
    "damaged imatrix": (model_recipe, _set("gguf.imatrix", _junk_imatrix), "not a readable imatrix file"),
    "Q2_K_S without an imatrix": (model_recipe, _set("gguf.quants", ["Q2_K_S"]), "Q2_K_S needs an importance matrix"),
}


def _write(tmp_path, recipe: dict):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_check_refuses_what_release_refuses_with_the_same_line(models, tmp_path, case, monkeypatch):
    make, change, needle = CASES[case]
    recipe = make(models)
    if case == "a stage the family lacks":
        _without_awq(monkeypatch, "Phi-3")
    if case == "slerp of three models":
        recipe["merge"]["models"].append({"model": models[1]})
    else:
        change(recipe, tmp_path)
    path = _write(tmp_path, recipe)
    code, out = _run("check", path)
    assert code != 0, out
    line = _one_line(out)
    assert needle in line, line
    work = tmp_path / "work"
    release_code, release_out = _run("release", path, "-o", work, "-q")
    assert (release_code, _one_line(release_out)) == (code, line)
    assert not work.exists() or not any(work.iterdir())   # refused before the first stage: nothing written


def test_a_warning_is_shown_by_check_and_strict_refuses_it_in_both(models, tmp_path):
    recipe = merge_recipe(models)
    recipe["merge"]["models"][1]["parameters"] = {"weight": 0.5}   # slerp does not read weight; mergekit ignores it
    path = _write(tmp_path, recipe)
    code, out = _run("check", path)
    assert code == 0 and "does not read `weight`" in out and "valid recipe" in out, out
    code, out = _run("check", path, "--strict")
    line = _one_line(out)
    assert code == 2 and "--strict" in line and "`weight`" in line
    work = tmp_path / "work"
    assert _run("release", path, "-o", work, "-q", "--strict") == (code, out) or \
        _one_line(_run("release", path, "-o", work, "-q", "--strict")[1]) == line
    assert not work.exists() or not any(work.iterdir())


def test_the_valid_recipes_pass_check_and_name_the_family(models, tmp_path):
    for make in (merge_recipe, model_recipe):
        code, out = _run("check", _write(tmp_path, make(models)))
        assert code == 0 and "valid recipe" in out and "model family Llama (LlamaForCausalLM)" in out, out
    recipe = model_recipe(models) | {"model": _phi3_model(tmp_path), "quality": False}
    code, out = _run("check", _write(tmp_path, recipe))
    assert code == 0 and "model family Phi-3 (Phi3ForCausalLM)" in out, out
