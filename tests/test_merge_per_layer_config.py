"""A merge that changes the layers (a passthrough "frankenmerge") rebuilds config.json's per-layer lists from the layers
it took: Gemma 3's ``layer_types`` (sliding or full attention) and SmolLM3's ``no_rope_layers``, so the output config
describes its layers and transformers loads it (mergekit 0.1.5 copies the donor's lists unchanged)."""

from __future__ import annotations

import json

import pytest

from releaser.merge import run_merge
from releaser_testing import tiny_family_model

SLICES = [[0, 2], [1, 4], [3, 4]]   # layers 0 1 | 1 2 3 | 3: six layers from four


@pytest.mark.parametrize("family, key", [("gemma3", "layer_types"), ("smollm3", "no_rope_layers")])
def test_passthrough_rebuilds_per_layer_lists(tmp_path, family, key):
    from transformers import AutoModelForCausalLM

    extra = {"sliding_window_pattern": 2} if family == "gemma3" else {}
    model = tiny_family_model(tmp_path / family, family, layers=4, vocab=256, **extra)
    source = json.loads((model / "config.json").read_text())[key]
    assert len(source) == 4 and len(set(map(str, source))) == 2, source   # two kinds of layer, so order shows
    config = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [{"model": str(model), "layer_range": r}]} for r in SLICES]}
    run_merge(config, tmp_path / "out")
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["num_hidden_layers"] == 6
    assert out[key] == [source[i] for i in (0, 1, 1, 2, 3, 3)]
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
