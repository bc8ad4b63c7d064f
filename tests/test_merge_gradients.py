"""Layer-indexed gradients (releaser extension): ``{layer: value}`` is linear between the given output layers and
constant outside them; tensors outside the layers take the first value (like mergekit's t=0 for them)."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from releaser.cli import app
from releaser.merge import run_merge
from releaser.merge.config import Conditional, evaluate
from releaser_testing import noised_variant, tiny_model

runner = CliRunner()
LAYERS = 6


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("gradients")
    a = tiny_model(root / "a", seed=0, layers=LAYERS)
    b = noised_variant(a, root / "b", seed=1)
    return root, str(a), str(b)


def expected(layer: int | None) -> float:
    # {1: 0.9, 4: 0.0}: 0.9 up to layer 1, linear to 0 at layer 4, then 0
    if layer is None or layer <= 1:
        return 0.9
    return max(0.0, 0.9 * (4 - layer) / 3)


def test_evaluate_mapping():
    g = {0: 0.9, 25: 0.0}
    assert evaluate(g, "x", 0.0, 0) == 0.9 and evaluate(g, "x", 0.0, 25) == 0.0 and evaluate(g, "x", 0.0, 30) == 0.0
    assert evaluate(g, "x", 0.0, 10) == pytest.approx(0.9 * 15 / 25)
    assert evaluate({3: 0.5}, "x", 0.0, 0) == 0.5 and evaluate({3: 0.5}, "x", 0.0, None) == 0.5
    cond = [Conditional(filter="mlp", value={0: 1.0, 2: 3.0})]
    assert evaluate(cond, "model.layers.1.mlp.up_proj.weight", 0.0, 1) == 2.0
    assert evaluate(cond, "model.layers.1.self_attn.q_proj.weight", 0.0, 1) is None


@pytest.mark.parametrize("form", ["models", "slices"])
def test_values_at_every_layer(pair, form):
    root, a, b = pair
    weight_b = {1: 0.9, 4: 0.0}
    if form == "models":
        cfg = {"merge_method": "linear", "dtype": "float32", "parameters": {"normalize": False},
               "models": [{"model": a, "parameters": {"weight": 1.0}},
                          {"model": b, "parameters": {"weight": weight_b}}]}
    else:   # two slices: the index is the output layer, across slices
        cfg = {"merge_method": "linear", "dtype": "float32", "parameters": {"normalize": False, "weight": weight_b},
               "slices": [{"sources": [{"model": a, "layer_range": [0, 3], "parameters": {"weight": 1.0}},
                                       {"model": b, "layer_range": [0, 3]}]},
                          {"sources": [{"model": a, "layer_range": [3, 6], "parameters": {"weight": 1.0}},
                                       {"model": b, "layer_range": [3, 6]}]}]}
    out = root / f"out-{form}"
    run_merge(cfg, out)
    got = load_file(out / "model.safetensors")
    sa, sb = load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")
    seen = set()
    for name, tensor in got.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        w = expected(layer)
        want = sa[name] + torch.tensor(w, dtype=torch.float32) * sb[name]
        assert torch.allclose(tensor, want, rtol=1e-6, atol=1e-7), (name, w)
        seen.add(layer)
    assert seen == {None, *range(LAYERS)}


def cli_error(tmp_path, cfg) -> str:
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    result = runner.invoke(app, ["merge", str(path), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code != 0
    text = result.output.strip()
    assert text.startswith("error:") and len(text.splitlines()) == 1 and "Traceback" not in text, text
    assert not (tmp_path / "out").exists()
    return text


@pytest.mark.parametrize("gradient, needles", [
    ({4: 0.0, 1: 0.9}, ["increasing order", "`weight`", "models[1].parameters"]),
    ({-1: 0.9, 4: 0.0}, [">= 0", "`weight`"]),
    ({0: 0.9, 6: 0.0}, ["layer 6 is out of range", "6 layers", "0 to 5", "models[1].parameters.weight"]),
    ({0: 0.9, 3: "x"}, ["models[1].parameters"]),
])
def test_bad_gradient_keys(pair, tmp_path, gradient, needles):
    _, a, b = pair
    cfg = {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 1.0}},
                                                {"model": b, "parameters": {"weight": gradient}}]}
    text = cli_error(tmp_path, cfg)
    for needle in needles:
        assert needle in text, text


def test_gradient_in_a_filter_is_range_checked(pair, tmp_path):
    _, a, b = pair
    cfg = {"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": b}],
           "parameters": {"t": [{"filter": "mlp", "value": {0: 0.0, 9: 1.0}}, {"value": 0.5}]}}
    assert "layer 9 is out of range" in cli_error(tmp_path, cfg)
