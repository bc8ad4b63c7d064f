"""End to end parity with mergekit 0.1.5: the same YAML configs merged by mergekit (one subprocess for all of them)
and by releaser's ``run_merge``, compared tensor by tensor on tiny Llama and Mistral (explicit head_dim) models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from releaser.merge import run_merge
from releaser_testing import noised_variant, tiny_model

pytestmark = pytest.mark.slow  # external oracle

SEED = 1234
GRADIENT_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
              {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
              {"value": 0.5}]


def _models(family: dict, weights=None, **per_model) -> list[dict]:
    """`models:` entries for a family; weights and per-model params are lists in model order (None skips one)."""
    out = []
    for i, ref in enumerate(family["models"]):
        params = {k: v[i] for k, v in per_model.items() if v[i] is not None}
        if weights is not None and weights[i] is not None:
            params["weight"] = weights[i]
        out.append({"model": ref, "parameters": params} if params else {"model": ref})
    return out


def deterministic_configs(llama: dict, mistral: dict) -> dict[str, dict]:
    L, M = llama["models"], mistral["models"]
    cfgs = {
        "linear": {"merge_method": "linear", "models": _models(llama, [0.3, [0.2, 0.8], 0.7])},
        "linear_filters": {"merge_method": "linear", "parameters": {"normalize": False}, "models": _models(
            mistral, [0.5, [{"filter": "mlp", "value": 0.1}, {"value": 0.3}], 0.2])},
        "slerp": {"merge_method": "slerp", "base_model": M[0], "parameters": {"t": GRADIENT_T},
                  "models": [{"model": M[0]}, {"model": M[1]}]},
        "slerp_slices": {"merge_method": "slerp", "base_model": L[1], "parameters": {"t": [0.1, 0.9]},
                         "slices": [{"sources": [{"model": L[0], "layer_range": [0, 2]},
                                                 {"model": L[1], "layer_range": [0, 2]}]},
                                    {"sources": [{"model": L[0], "layer_range": [2, 4]},
                                                 {"model": L[1], "layer_range": [2, 4]}],
                                     "parameters": {"t": GRADIENT_T}}]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": L[0], "parameters": {"lambda": 0.9},
                            "models": _models(llama, [None, 0.6, [0.2, 0.8]])},
        "ties": {"merge_method": "ties", "base_model": L[0], "models": _models(
            llama, [None, 0.5, 0.7], density=[None, 0.5, [0.3, 0.9]])},
        "ties_mistral": {"merge_method": "ties", "base_model": M[0],
                         "parameters": {"normalize": False, "int8_mask": True},
                         "models": _models(mistral, [None, 0.5, 0.7], density=[None, 0.6, 0.4])},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": L[0], "models": _models(
            llama, [None, 0.5, 0.7], density=[None, 0.8, 0.7], gamma=[None, 0.05, 0.02])},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": M[0], "models": _models(
            mistral, [None, 1.0, 0.5], density=[None, 0.8, 0.9])},
        "model_stock": {"merge_method": "model_stock", "base_model": L[0], "models": _models(llama)},
        "model_stock_filter_wise": {"merge_method": "model_stock", "base_model": M[0],
                                    "parameters": {"filter_wise": True}, "models": _models(mistral)},
        "passthrough": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": L[0], "layer_range": [0, 3]}]},
            {"sources": [{"model": L[1], "layer_range": [1, 4], "parameters": {"scale": 0.5}}]}]},
    }
    out = {}
    for name, cfg in cfgs.items():
        out[f"{name}-float32"] = {**cfg, "dtype": "float32"}
        out[f"{name}-bfloat16"] = {**cfg, "dtype": "bfloat16"}
    return out


def layout_configs(tied: dict, qwen: dict, half: dict, llama: dict) -> dict[str, dict]:
    """Other layouts and dtypes: tied embeddings, Qwen2 biases, float16 storage, out_dtype differing from dtype."""
    T, Q, H, L = tied["models"], qwen["models"], half["models"], llama["models"]
    return {
        "tied_slerp": {"merge_method": "slerp", "base_model": T[0], "dtype": "float32", "parameters": {"t": 0.6},
                       "models": _models(tied)[:2]},
        "tied_ties": {"merge_method": "ties", "base_model": T[0], "dtype": "bfloat16",
                      "models": _models(tied, [None, 0.5, 0.5], density=[None, 0.5, 0.5])},
        "qwen2_model_stock": {"merge_method": "model_stock", "base_model": Q[0], "dtype": "bfloat16",
                              "models": _models(qwen)},
        "qwen2_task_arithmetic": {"merge_method": "task_arithmetic", "base_model": Q[0],
                                  "models": _models(qwen, [None, 0.5, 0.5])[1:]},  # base added implicitly
        "float16_ties": {"merge_method": "ties", "base_model": H[0],
                         "models": _models(half, [None, 0.7], density=[None, 0.4])},
        "float16_slerp": {"merge_method": "slerp", "base_model": H[0], "parameters": {"t": 0.4},
                          "models": _models(half)},
        "float16_linear": {"merge_method": "linear", "models": _models(half, [0.3, 0.6])},
        "slerp_out_dtype": {"merge_method": "slerp", "base_model": L[0], "dtype": "bfloat16", "out_dtype": "float32",
                            "parameters": {"t": 0.3}, "models": _models(llama)[:2]},
    }


def random_configs(llama: dict) -> dict[str, dict]:
    L = llama["models"]
    per = {"density": [None, 0.3, 0.3]}
    return {
        name: {"merge_method": name, "base_model": L[0], "dtype": "float32",
               "models": _models(llama, [None, 0.5, 0.5], **per,
                                 **({"epsilon": [None, 0.1, 0.1]} if name.startswith("della") else {}))}
        for name in ["dare_ties", "dare_linear", "della", "della_linear"]
    }


MERGEKIT_SCRIPT = textwrap.dedent("""
    import json, sys
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    jobs = json.load(open(sys.argv[1]))
    for out, cfg, seed in jobs:
        options = MergeOptions(copy_tokenizer=False, write_model_card=False, random_seed=seed, quiet=True)
        run_merge(MergeConfiguration.model_validate(cfg), out, options)
""")


def run_mergekit(root: Path, jobs: list) -> None:
    """Run mergekit 0.1.5 on every (output folder, config, random seed) job in one subprocess."""
    (root / "jobs.json").write_text(json.dumps(jobs))
    (root / "run_mergekit.py").write_text(MERGEKIT_SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(root / "run_mergekit.py"), str(root / "jobs.json")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _family(root: Path, arch: str, tag: str = "", count: int = 3, **kw) -> dict:
    base = tiny_model(root / f"{arch}{tag}-base", arch=arch, seed=0, **kw)
    variants = [noised_variant(base, root / f"{arch}{tag}-v{i}", seed=i) for i in range(1, count)]
    return {"models": [str(base)] + [str(v) for v in variants]}


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    llama = _family(root, "llama", layers=4, hidden=64, intermediate=128)
    mistral = _family(root, "mistral", layers=4, hidden=64, intermediate=96, heads=4, kv_heads=2, head_dim=24)
    tied = _family(root, "llama", "-tied", tied=True)
    qwen = _family(root, "qwen2")
    half = _family(root, "llama", "-f16", count=2, dtype="float16")
    det = {**deterministic_configs(llama, mistral), **layout_configs(tied, qwen, half, llama)}
    rnd = random_configs(llama)
    jobs = [(str(root / "mk" / n), c, None) for n, c in det.items()]
    jobs += [(str(root / "mk" / n), c, SEED) for n, c in rnd.items()]
    run_mergekit(root, jobs)
    return {"root": root, "det": det, "rnd": rnd, "llama": llama}


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def ours(parity, name: str, cfg: dict, tag: str = "", seed: int | None = None) -> dict[str, torch.Tensor]:
    out = parity["root"] / "ours" / f"{name}{tag}"
    run_merge({**cfg, "random_seed": seed} if seed is not None else cfg, out)
    return load_all(out)


def test_deterministic_methods_match_mergekit(parity):
    failures = []
    for name, cfg in parity["det"].items():
        want = load_all(parity["root"] / "mk" / name)
        got = ours(parity, name, cfg)
        assert set(got) == set(want), (name, set(got) ^ set(want))
        for key, w in want.items():
            g = got[key]
            assert g.dtype == w.dtype and g.shape == w.shape, (name, key)
            if w.dtype == torch.bfloat16:
                ok = torch.equal(g, w)
            else:
                ok = bool(((g.double() - w.double()).abs() <= 1e-6 * w.double().abs().max().clamp(min=1e-30)).all())
            if not ok:
                failures.append(f"{name}: {key} max abs diff {(g.double() - w.double()).abs().max().item():.3g}")
    assert not failures, "\n".join(failures[:20])


def test_passthrough_frankenmerge_layout(parity):
    out = parity["root"] / "ours" / "passthrough-float32"
    if not out.exists():
        ours(parity, "passthrough-float32", parity["det"]["passthrough-float32"])
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    mk = json.loads((parity["root"] / "mk" / "passthrough-float32" / "config.json").read_text())
    assert mk["num_hidden_layers"] == 6
    got = load_all(out)
    a = load_file(Path(parity["llama"]["models"][0]) / "model.safetensors")
    b = load_file(Path(parity["llama"]["models"][1]) / "model.safetensors")
    assert torch.equal(got["model.layers.2.mlp.up_proj.weight"], a["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.3.mlp.up_proj.weight"], 0.5 * b["model.layers.1.mlp.up_proj.weight"])


def _kept_fraction(merged: dict, base: dict) -> float:
    changed = total = 0
    for key, m in merged.items():
        if m.ndim == 2:
            changed += int((m != base[key]).sum())
            total += m.numel()
    return changed / total


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_methods_reproducible_with_mergekit_statistics(parity, method):
    cfg = parity["rnd"][method]
    first = ours(parity, method, cfg, "-a", seed=SEED)
    again = ours(parity, method, cfg, "-b", seed=SEED)
    other = ours(parity, method, cfg, "-c", seed=SEED + 1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)

    base = load_file(Path(parity["llama"]["models"][0]) / "model.safetensors")
    want = load_all(parity["root"] / "mk" / method)
    # two task vectors, each kept with probability 0.3 on average: a weight moves where either is kept
    ours_kept, mk_kept = _kept_fraction(first, base), _kept_fraction(want, base)
    expected = 1 - 0.7 ** 2
    if method.endswith("ties"):  # sign consensus can drop the only kept value where the two disagree
        assert abs(ours_kept - mk_kept) < 0.01
    else:
        assert abs(ours_kept - expected) < 0.01 and abs(mk_kept - expected) < 0.01
    # same overall magnitude of the merged task vector as mergekit (L1 rescale, not 1/density)
    for key in ["model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"]:
        ours_l1 = (first[key] - base[key]).abs().sum()
        mk_l1 = (want[key] - base[key]).abs().sum()
        assert torch.allclose(ours_l1, mk_l1, rtol=0.05), (key, ours_l1, mk_l1)
