"""AWQ math on tiny models: folding scales keeps the function, AWQ beats round-to-nearest on outlier channels."""

from __future__ import annotations

import copy

import pytest
import torch

from releaser.awq.run import LINEARS, BlockRunner, Settings, block_state, family_classes, fold_group, scaling_groups
from releaser.awq.quantize import quantize
from releaser.checkpoint import CheckpointReader, architecture_for
from releaser_testing import tiny_model


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


@pytest.mark.parametrize("arch,kv_heads", [("llama", 4), ("llama", 2), ("qwen2", 4)])
def test_folding_scales_keeps_logits(tmp_path, arch, kv_heads):
    path = tiny_model(tmp_path / "m", arch=arch, layers=2, hidden=64, intermediate=128, heads=4, kv_heads=kv_heads)
    model = _hf_model(path)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    g = torch.Generator().manual_seed(1)
    folded = set()
    for layer in model.model.layers:
        for group in scaling_groups(layer):
            width = layer.get_submodule(group.linears[0]).in_features
            fold_group(layer, group, torch.exp(torch.randn(width, generator=g) * 0.7))
            folded.add(group.prev)
    assert ("self_attn.v_proj" in folded) == (kv_heads == 4)     # v -> o only without grouped-query attention
    with torch.no_grad():
        after = model(ids).logits
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, torch.ones(64))
    rel = float((after - before).norm() / before.norm())
    assert rel < 1e-5, rel


def _outlier_block(tmp_path):
    """Block 0 of a tiny Llama whose hidden states have a few huge channels (activation outliers), plus its input."""
    path = tiny_model(tmp_path / "m", layers=1, hidden=128, intermediate=256, heads=4, kv_heads=4)
    reader = CheckpointReader(path)
    arch = architecture_for(reader.config)
    classes = family_classes(reader.config, "tiny")
    state = block_state(reader, arch, 0)
    runner = BlockRunner(classes, Settings(128, torch.device("cpu"), torch.float32), 64)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(16, 64, 128, generator=g)
    outliers = torch.tensor([5, 17, 70, 101])
    hidden[..., outliers] *= 60
    state["input_layernorm.weight"][outliers] *= 8
    state["post_attention_layernorm.weight"][outliers] *= 8
    return runner, state, hidden


@torch.no_grad()
def _quantize_linears(layer, group):
    for name in LINEARS:
        lin = layer.get_submodule(name)
        lin.weight.copy_(quantize(lin.weight, group).dequantize())


@torch.no_grad()
def test_awq_beats_round_to_nearest_on_outlier_channels(tmp_path):
    runner, state, hidden = _outlier_block(tmp_path)
    layer = runner.build(state, 0)
    reference, feats = runner.capture(layer, hidden)

    rtn = copy.deepcopy(layer)
    _quantize_linears(rtn, 128)
    err_rtn = float((runner.forward(rtn, hidden) - reference).pow(2).mean())

    report = runner.awq_block(layer, feats)
    assert set(report.ratios) == {"input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"}
    assert max(report.ratios.values()) > 0                           # some group chose activation-aware scales
    _quantize_linears(layer, 128)
    err_awq = float((runner.forward(layer, hidden) - reference).pow(2).mean())
    assert err_awq < 0.8 * err_rtn, (err_awq, err_rtn)


def test_clip_search_matches_direct_partial_products():
    """The Gram-matrix form of the clip error picks the same bounds as AutoAWQ's direct partial-product form."""
    from releaser.awq.quantize import fake_quantize
    from releaser.awq.search import CLIP_STEPS, N_GRID, search_clip

    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 128, generator=g) * 0.05
    w[:, 7] *= 20
    x = torch.randn(300, 128, generator=g)
    x[:, 7] *= 0.01
    got = search_clip(w, x, 32)
    wg = w.reshape(48, 1, 4, 32)
    xg = x.reshape(1, 300, 4, 32)
    org_out = (xg * wg).sum(-1)
    org_max = wg.abs().amax(-1, keepdim=True)
    best, best_err = org_max.clone(), torch.full_like(org_max, float("inf"))
    for i in range(CLIP_STEPS):
        mv = org_max * (1 - i / N_GRID)
        q = fake_quantize(torch.clamp(wg, -mv, mv), 32)
        err = ((xg * q).sum(-1) - org_out).pow(2).mean(1).view(best_err.shape)
        best = torch.where(err < best_err, mv, best)
        best_err = torch.minimum(err, best_err)
    want = best.reshape(48, 4)
    assert float((got == want).float().mean()) > 0.97      # ties between near-equal errors may round differently
    assert (got < w.reshape(48, 4, 32).abs().amax(-1)).any()  # some groups are clipped
