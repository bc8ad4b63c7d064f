"""Strict parameters: misspelt or misplaced parameters, out-of-range values, filters that match nothing, mergekit keys
releaser does not support, non-finite results, parameter types, and the method registry."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from releaser.cli import app
from releaser.errors import ModelError
from releaser.merge import run_merge
from releaser.merge.methods import REQUIRED, Param, between
from releaser.stage import Reporter
from releaser_testing import noised_variant, tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("strict")
    base = tiny_model(root / "base", seed=0)
    return [str(base)] + [str(noised_variant(base, root / f"v{i}", seed=i)) for i in (1, 2)]


def ties(family, **extra):
    cfg = {"merge_method": "ties", "base_model": family[0], "dtype": "float32",
           "models": [{"model": family[0]},
                      {"model": family[1], "parameters": {"weight": 0.5, "density": 0.5}},
                      {"model": family[2], "parameters": {"weight": 0.5, "density": 0.5}}]}
    cfg.update(extra)
    return cfg


def cli_error(tmp_path, cfg) -> str:
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["merge", str(path), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code != 0
    text = result.output.strip()
    assert text.startswith("error:") and len(text.splitlines()) == 1 and "Traceback" not in text, text
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    return text


def test_misspelt_global_parameter_names_path_and_closest(tmp_path, family):
    text = cli_error(tmp_path, ties(family, parameters={"lamda": 0.5}))
    assert "`parameters.lamda`" in text and "`lambda`" in text and "did you mean" in text


def test_misspelt_parameter_at_model_level(tmp_path, family):
    cfg = ties(family)
    cfg["models"][2]["parameters"]["normalise"] = True
    text = cli_error(tmp_path, cfg)
    assert "`models[2].parameters.normalise`" in text and "`normalize`" in text


def test_misspelt_parameter_in_a_slice_source(tmp_path, family):
    cfg = {"merge_method": "slerp", "base_model": family[0], "parameters": {"t": 0.5},
           "slices": [{"sources": [{"model": family[0], "layer_range": [0, 4]},
                                   {"model": family[1], "layer_range": [0, 4], "parameters": {"wieght": 1.0}}]}]}
    text = cli_error(tmp_path, cfg)
    assert "`slices[0].sources[1].parameters.wieght`" in text and "slerp" in text


def test_global_parameter_set_per_model_is_not_used(tmp_path, family):
    cfg = {"merge_method": "slerp", "base_model": family[0],
           "models": [{"model": family[0]}, {"model": family[1], "parameters": {"t": 0.5}}]}
    text = cli_error(tmp_path, cfg)
    assert "`models[1].parameters.t`" in text and "top-level `parameters:`" in text
    cfg["parameters"] = {"t": 0.3}   # the per-model t is then ignored, as mergekit ignores it: a warning
    reporter = Collect()
    run_merge(cfg, tmp_path / "ok", reporter=reporter)
    assert len(reporter.warnings) == 1 and "`models[1].parameters.t`" in reporter.warnings[0]


def test_parameter_of_another_method_is_a_warning_and_strict_refuses_it(tmp_path, family):
    cfg = {"merge_method": "linear", "parameters": {"t": 0.5},
           "models": [{"model": f, "parameters": {"weight": 1.0}} for f in family[:2]]}
    reporter = Collect()
    result = run_merge(cfg, tmp_path / "ok", reporter=reporter)
    assert reporter.warnings == result.warnings and len(result.warnings) == 1
    assert "`parameters.t`" in result.warnings[0] and "linear does not read `t`" in result.warnings[0]
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["merge", str(path), str(tmp_path / "out"), "--quiet", "--strict"])
    assert result.exit_code == 2 and "`parameters.t`" in result.output and "--strict" in result.output
    assert not (tmp_path / "out").exists()


def test_unsupported_mergekit_keys_say_so(tmp_path, family):
    text = cli_error(tmp_path, ties(family, modules={"text": {"models": []}}))
    assert "`modules`" in text and "does not support" in text and "spelling" not in text
    cfg = {"merge_method": "slerp", "base_model": family[0], "parameters": {"t": 0.5},
           "slices": [{"sources": [{"model": family[0], "layer_range": [0, 4]},
                                   {"model": family[1], "layer_range": [0, 4]}], "residual_weight": 0.5}]}
    text = cli_error(tmp_path, cfg)
    assert "slices[0].residual_weight" in text and "does not support" in text


@pytest.mark.parametrize("density, needle", [(1.5, "(0, 1]"), (0.0, "(0, 1]"), ("half", "a number")])
def test_density_range_and_type(tmp_path, family, density, needle):
    cfg = ties(family)
    cfg["models"][1]["parameters"]["density"] = density
    text = cli_error(tmp_path, cfg)
    assert "`density`" in text and needle in text and family[1] in text


def test_density_gradient_checked_at_every_layer(tmp_path, family):
    cfg = ties(family)
    cfg["models"][1]["parameters"]["density"] = [0.9, 1.2]   # above 1 only from the second layer on
    text = cli_error(tmp_path, cfg)
    assert "`density`" in text and "(0, 1]" in text


def test_della_epsilon_range(tmp_path, family):
    cfg = ties(family, merge_method="della")
    cfg["models"][1]["parameters"].update(density=0.9, epsilon=0.2)
    text = cli_error(tmp_path, cfg)
    assert "density + epsilon < 1" in text


def test_linear_weights_summing_to_zero(tmp_path, family):
    cfg = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": family[1], "parameters": {"weight": 1.0}},
                      {"model": family[2], "parameters": {"weight": -1.0}}]}
    text = cli_error(tmp_path, cfg)
    assert "add up to 0" in text and "normalize: false" in text
    cfg["parameters"] = {"normalize": False}
    run_merge(cfg, tmp_path / "ok")   # a plain difference is fine without normalize


class Collect(Reporter):
    def __init__(self):
        self.warnings = []

    def warning(self, text):
        self.warnings.append(text)


def test_filter_matching_no_tensor_is_a_warning(tmp_path, family):
    cfg = ties(family)
    cfg["models"][1]["parameters"]["weight"] = [{"filter": "self_atn", "value": 0.9}, {"value": 0.5}]
    reporter = Collect()
    result = run_merge(cfg, tmp_path / "out", reporter=reporter)
    assert len(reporter.warnings) == 1 and reporter.warnings == result.warnings
    assert "models[1].parameters.weight[0].filter" in reporter.warnings[0] and "self_atn" in reporter.warnings[0]
    cfg["models"][1]["parameters"]["weight"][0]["filter"] = "self_attn"
    assert run_merge(cfg, tmp_path / "out2").warnings == []


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_output_names_the_tensor(tmp_path, family, value):
    bad = tmp_path / "bad"
    tiny_model(bad, seed=0)
    state = load_file(bad / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = value
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    cfg = {"merge_method": "linear", "models": [{"model": str(bad), "parameters": {"weight": 0.5}},
                                                {"model": family[1], "parameters": {"weight": 0.5}}]}
    with pytest.raises(ModelError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has NaN or infinite"):
        run_merge(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    text = cli_error(tmp_path, cfg)
    assert "model.layers.1.mlp.up_proj.weight" in text


def test_parameter_declarations_types_and_ranges():
    assert Param(10).coerce(12.0) == 12 and isinstance(Param(10).coerce("12"), int)
    with pytest.raises(ValueError, match="whole number"):
        Param(10).coerce(2.5)
    assert Param("row").coerce("column") == "column"
    with pytest.raises(ValueError, match="a string"):
        Param("row").coerce(3)
    assert Param([1.0], kind=list).coerce([1, "2.5"]) == [1, 2.5]
    with pytest.raises(ValueError, match="list of numbers"):
        Param([1.0], kind=list).coerce(["a"])
    assert Param(False).coerce("yes") is True
    assert Param(REQUIRED).kind is float and Param(REQUIRED).coerce("0.5") == 0.5
    with pytest.raises(ValueError, match="a number"):
        Param(REQUIRED).coerce(True)
    check = Param(1.0, check=between(0, 1, low_open=True))
    assert check.coerce(1) == 1.0
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        check.coerce(0)


def test_registering_a_method_keeps_the_builtins():
    code = ("from releaser.merge.methods import Method, register, method_names, get_method\n"
            "register(Method('mine', 'Mine', 'https://example.org', 'x', fn=lambda *a: None))\n"
            "names = method_names()\n"
            "assert 'mine' in names and 'linear' in names and 'ties' in names, names\n"
            "assert get_method('slerp').name == 'slerp'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_method_table_module_is_named_after_its_methods():
    from releaser.merge.methods import get_method

    assert get_method("dare_ties").fn.func.__module__.endswith("ties_dare_della")
    assert "add up to 0" in get_method("linear").validate({"normalize": True}, [{"weight": 1.0}, {"weight": -1.0}],
                                                           None)
