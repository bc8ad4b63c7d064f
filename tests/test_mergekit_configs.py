"""mergekit's own test configs (``tests/test_basic_merges.py`` of mergekit 0.1.5: ``two_model_config`` puts
``weight`` on every model whatever the method) merge in releaser: a parameter the method does not read is a warning
naming it, as mergekit ignores it; ``--strict`` refuses it; a name no method knows stays an error."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from releaser.cli import app
from releaser.errors import ConfigError
from releaser.merge import run_merge
from releaser.merge.methods import get_method
from releaser_testing import noised_variant, tiny_model

runner = CliRunner()

# (merge_method, base model: None or one of "a"/"c", global parameters) exactly as mergekit's tests give them
MERGEKIT_TESTS = [
    ("linear", None, None),
    ("slerp", "a", {"t": 0.35}),
    ("nuslerp", None, {"nuslerp_row_wise": False, "nuslerp_flatten": False}),
    ("nuslerp", "c", {"nuslerp_row_wise": True, "nuslerp_flatten": True}),
    ("task_arithmetic", "c", None),
    ("breadcrumbs", "c", None),
    ("ties", "c", {"density": 0.3}),
    ("sce", "c", {"select_topk": 0.5}),
    ("ram", "c", None),
    ("ramplus_tl", "c", {"r": 0.05, "alpha": 1.0}),
    ("multislerp", "c", None),
    ("dare_ties", "c", {"density": 0.66}),
    ("model_stock", "c", None),
    ("model_stock", "c", {"filter_wise": True}),
    ("arcee_fusion", "a", None),
    ("nearswap", "a", {"t": 0.0001}),
    ("della", "c", {"density": 0.66, "epsilon": 0.05, "lambda": 0.5}),
    ("karcher", "c", {"max_iter": 5, "tol": 1e-5}),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit_tests")
    a = tiny_model(root / "a", seed=0)
    return {"a": str(a), "b": str(noised_variant(a, root / "b", seed=1)), "c": str(noised_variant(a, root / "c", seed=2))}


def two_model_config(models, method, base, params):
    """mergekit's ``TestBasicMerges.two_model_config``."""
    cfg = {"merge_method": method, "models": [{"model": models["a"], "parameters": {"weight": 0.6}},
                                              {"model": models["b"], "parameters": {"weight": 0.4}}],
           "dtype": "bfloat16"}
    if base:
        cfg["base_model"] = models[base]
    if method == "model_stock":   # mergekit's test merges b and c onto a
        cfg["models"] = [{"model": models["b"], "parameters": {"weight": 0.6}},
                         {"model": models["c"], "parameters": {"weight": 0.4}}]
        cfg["base_model"] = models["a"]
    if params:
        cfg["parameters"] = params
    return cfg


class Collect:
    def __init__(self):
        self.warnings = []

    def warning(self, text):
        self.warnings.append(text)

    def message(self, text):
        pass

    def progress(self, *args, **kwargs):
        from releaser.stage import Reporter

        return Reporter().progress(*args, **kwargs)


@pytest.mark.parametrize("method, base, params", MERGEKIT_TESTS, ids=[f"{m}-{i}" for i, (m, _, _) in
                                                                     enumerate(MERGEKIT_TESTS)])
def test_mergekit_test_config_merges(tmp_path, models, method, base, params):
    from mergekit.config import MergeConfiguration

    cfg = two_model_config(models, method, base, params)
    MergeConfiguration.model_validate(cfg)   # mergekit itself accepts it
    reporter = Collect()
    result = run_merge(cfg, tmp_path / "out", reporter=reporter)
    reads_weight = "weight" in get_method(method).model_specs
    if reads_weight:
        assert result.warnings == []
    else:
        assert len(result.warnings) == 1 and reporter.warnings == result.warnings
        text = result.warnings[0]
        assert "`models[0].parameters.weight`" in text and "`models[1].parameters.weight`" in text
        assert f"{method} does not read `weight`" in text and "ignored" in text
        with pytest.raises(ConfigError, match="--strict"):
            run_merge(cfg, tmp_path / "strict", strict=True)
        assert not (tmp_path / "strict").exists()


def test_weight_given_to_slerp_on_the_command_line(tmp_path, models):
    cfg = two_model_config(models, "slerp", "a", {"t": 0.35})
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    ok = runner.invoke(app, ["merge", str(path), str(tmp_path / "out"), "--quiet"])
    assert ok.exit_code == 0, ok.output
    assert "weight" in ok.output and "ignored" in ok.output
    strict = runner.invoke(app, ["merge", str(path), str(tmp_path / "out2"), "--quiet", "--strict"])
    assert strict.exit_code == 2 and strict.output.startswith("error:") and len(strict.output.splitlines()) == 1
    assert not (tmp_path / "out2").exists()


def test_a_name_no_method_knows_stays_an_error(tmp_path, models):
    cfg = two_model_config(models, "task_arithmetic", "c", {"lamda": 0.5})
    with pytest.raises(ConfigError, match=r"`parameters.lamda`.*did you mean `lambda`"):
        run_merge(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
