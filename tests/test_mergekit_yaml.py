"""The ``mergekit_config.yml`` releaser ships with a merge is one mergekit's own parser accepts: releaser's ``lora:``
key becomes mergekit's ``model+adapter``, a LoRA weight mergekit cannot express goes into a comment, and the model
card still states it."""

from __future__ import annotations

import pytest
import yaml
from mergekit.config import MergeConfiguration

from releaser.card.facts import merge_facts
from releaser.merge import run_merge
from releaser_testing import noised_variant, tiny_model
from test_merge_lora import make_adapter


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk_yaml")
    base = tiny_model(root / "base", seed=0)
    other = noised_variant(base, root / "other", seed=1)
    adapter = make_adapter(base, root / "adapter", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return str(base), str(other), str(adapter)


def shipped(folder) -> str:
    return (folder / "mergekit_config.yml").read_text()


@pytest.mark.parametrize("weight", [0.25, 1.0])
def test_models_form_with_a_weighted_lora(tmp_path, inputs, weight):
    base, other, adapter = inputs
    cfg = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": other, "lora": {"path": adapter, "weight": weight}, "parameters": {"weight": 0.5}},
                      {"model": base, "parameters": {"weight": 0.5}}]}
    run_merge(cfg, tmp_path / "out")
    text = shipped(tmp_path / "out")
    data = yaml.safe_load(text)
    MergeConfiguration.model_validate(data)   # mergekit reads it
    assert "lora:" not in text
    assert data["models"][0]["model"] == f"{other}+{adapter}"
    assert (f"# LoRA weight 0.25: {other}+{adapter}" in text) == (weight == 0.25)
    facts = merge_facts(tmp_path / "out")
    assert [(lr.lora.ref, lr.model.ref) for lr in facts.loras] == [("adapter", "other")]   # local: folder names
    assert ("LoRA weight 0.25" in facts.loras[0].lora.details) == (weight == 0.25)


def test_slices_form_as_the_demo_writes_it(tmp_path, inputs):
    base, other, adapter = inputs
    cfg = {"merge_method": "slerp", "base_model": base, "parameters": {"t": 0.5}, "dtype": "float32",
           "slices": [{"sources": [{"model": base, "layer_range": [0, 4]},
                                   {"model": other, "layer_range": [0, 4], "lora": {"path": adapter, "weight": 0.5}}]}]}
    run_merge(cfg, tmp_path / "out")
    text = shipped(tmp_path / "out")
    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    assert str(config.slices[0].sources[1].model) == f"{other}+{adapter}"
    assert "lora:" not in text and f"# LoRA weight 0.5: {other}+{adapter}" in text


def test_a_config_without_lora_is_shipped_as_written(tmp_path, inputs):
    base, other, _ = inputs
    path = tmp_path / "cfg.yml"
    path.write_text(f"# my merge\nmerge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 1}}\n"
                    f"  - model: {other}\n    parameters: {{weight: 1}}\n")
    run_merge(path, tmp_path / "out")
    assert shipped(tmp_path / "out") == path.read_text()
    MergeConfiguration.model_validate(yaml.safe_load(shipped(tmp_path / "out")))
