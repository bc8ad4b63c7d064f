"""The methods added after the first twelve (nuslerp, multislerp, karcher, sce, nearswap, arcee_fusion, ram,
ramplus_tl) against mergekit 0.1.5: declared parameters and contracts, tensor-level results, and whole merges of tiny
models (one mergekit subprocess for all configs)."""

from __future__ import annotations

import pytest
import torch
from test_methods import ours, rel_close, theirs
from test_parity import _family, _models, load_all, run_mergekit

from releaser.errors import ConfigError
from releaser.merge import run_merge
from releaser.merge.methods import REQUIRED, get_method, method_names

NEW = ["nuslerp", "multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl"]


def test_every_mergekit_method_is_registered_with_its_parameters_and_contract():
    from mergekit import merge_methods
    from mergekit.merge_methods.base import MISSING, ParameterScope
    from mergekit.merge_methods.registry import registered_methods

    assert {m.spec.name for m in registered_methods()} == set(method_names())
    for m in registered_methods():
        spec, mine = m.spec, get_method(m.spec.name)
        assert mine.pretty_name == spec.pretty_name, spec.name
        assert mine.description and mine.reference_url.startswith("https://")
        assert {p.name for p in spec.parameters} == {*mine.global_params, *mine.model_params}, spec.name
        for p in spec.parameters:
            assert (p.scope == ParameterScope.SHARED) == (p.name in mine.global_params), (spec.name, p.name)
            declared = {**mine.global_params, **mine.model_params}[p.name]
            expected = REQUIRED if p.default is MISSING else p.default
            assert declared == expected or declared is expected, (spec.name, p.name)
            kind = {**mine.global_specs, **mine.model_specs}[p.name].kind
            assert p.value_type in (kind, None) or p.default is None, (spec.name, p.name, p.value_type, kind)
            assert (p.scope == ParameterScope.INPUT) == (p.name in mine.model_params and mine.base_model_params), \
                (spec.name, p.name)
        c = spec.contract
        assert (mine.min_models, mine.max_models) == (c.min_inputs, c.max_inputs), spec.name
        assert (mine.min_others or None, mine.max_others) == (c.min_non_base or None, c.max_non_base), spec.name
        assert mine.base == c.base.value, spec.name
    assert merge_methods.get("karcher").spec.contract.base.value == "ignored"


def tensors(n, shape, dtype=torch.float32, seed=0, noise=0.05):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base] + [(base + noise * torch.randn(shape, generator=g)).to(dtype) for _ in range(n - 1)], base.to(dtype)


def check(name, ts, base_index, params=None, per=None, exact=True):
    got = ours(name, ts, base_index, params, per, seed=0)
    want = theirs(name, ts, base_index, params, per)
    assert got.dtype == want.dtype or got.to(want.dtype).dtype == want.dtype
    if exact:
        assert torch.equal(got.to(want.dtype), want), (name, params, (got.double() - want.double()).abs().max())
    else:
        assert rel_close(got, want), (name, params)


SHAPES = [(24, 16), (40,), (6, 5)]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("flags", [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                                   {"nuslerp_row_wise": True}])
def test_nuslerp(dtype, shape, flags):
    ts, _ = tensors(3, shape, dtype, seed=1)
    ts[0] = ts[0].to(dtype)
    per = [{"weight": 0.2}, {"weight": 0.3}, {"weight": 0.9}]
    check("nuslerp", ts[1:], None, flags, per[1:])            # two models, no base
    check("nuslerp", ts, 0, flags, [{}, *per[1:]])            # task vectors around a base
    check("nuslerp", [ts[1], ts[0], ts[2]], 1, flags, [per[1], {}, per[2]])   # base in the middle
    check("nuslerp", ts[1:], None, flags, [{"weight": 1.0}, {"weight": -1.0}])   # weights summing to 0: t = 0.5
    check("nuslerp", [ts[1], 2 * ts[1]], None, flags, per[1:])   # parallel: lerp


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_multislerp(dtype, shape):
    ts, _ = tensors(4, shape, dtype, seed=2)
    ts[0] = ts[0].to(dtype)
    per = [{"weight": w} for w in (0.5, 0.2, 0.3, 0.5)]
    for params in [{}, {"normalize_weights": False}, {"eps": 1e-6}]:
        check("multislerp", ts[1:], None, params, per[1:])
        check("multislerp", ts, 0, params, [{}, *per[1:]])
        check("multislerp", ts[:2], 0, params, [{}, per[1]])     # one model besides the base: that model
    a = ts[1]
    check("multislerp", [a, -a], None, {}, [{"weight": 1.0}, {"weight": 1.0}])   # cancel out, two: weighted sum
    with pytest.raises(ConfigError, match="cancel out"):
        ours("multislerp", [a, -a, a, -a], None, {}, [{"weight": 1.0}] * 4)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_karcher(dtype, shape):
    ts, _ = tensors(4, shape, dtype, seed=3, noise=0.5)
    ts = [t.to(dtype) for t in ts]
    for params in [{}, {"max_iter": 3}, {"tol": 1e-3}, {"max_iter": 50, "tol": 1e-8}]:
        check("karcher", ts, None, params)
        check("karcher", ts, 0, params)      # the base is just another input
    zero = torch.zeros(shape, dtype=dtype)
    check("karcher", [zero, ts[1], ts[2]], None, {})
    check("karcher", [zero, zero], None, {})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_sce(dtype, shape):
    ts, _ = tensors(4, shape, dtype, seed=4)
    ts[0] = ts[0].to(dtype)
    for params in [{}, {"select_topk": 0.5}, {"select_topk": 0.1, "int8_mask": True}, {"select_topk": 0.0}]:
        check("sce", ts, 0, params)
        check("sce", [ts[1], ts[0], ts[2]], 1, params)
    assert ours("sce", ts[:1], 0, {}) is ts[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0.0, 0.01, 0.05, 1.0])
def test_nearswap(dtype, t):
    ts, _ = tensors(2, (32, 8), dtype, seed=5)
    ts[0] = ts[0].to(dtype)
    check("nearswap", ts, 0, {"t": t})
    check("nearswap", ts[::-1], 1, {"t": t})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(64, 300)])
def test_arcee_fusion(dtype, shape):
    ts, _ = tensors(2, shape, dtype, seed=6, noise=0.3)
    ts[0] = ts[0].to(dtype)
    check("arcee_fusion", ts, 0)
    check("arcee_fusion", ts[::-1], 1)


def test_arcee_fusion_large_tensor_samples_with_the_generator():
    ts, _ = tensors(2, (1100, 1000), seed=7, noise=0.3)
    a = ours("arcee_fusion", ts, 0, seed=1)
    assert torch.equal(a, ours("arcee_fusion", ts, 0, seed=1))
    kept = (a != ts[0]).float().mean().item()
    exact = theirs("arcee_fusion", ts, 0, seed=1)        # mergekit samples from the global RNG: same statistics
    assert abs(kept - (exact != ts[0]).float().mean().item()) < 0.01


@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_ram(name, dtype, shape):
    g = torch.Generator().manual_seed(8)
    base = torch.randn(shape, generator=g)
    ts = [base]
    for _ in range(3):   # sparse task vectors: some positions changed by one model, some by several
        change = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.4)
        ts.append(base + 0.1 * change)
    ts = [t.to(dtype) for t in ts]
    extra = [{}, {"epsilon": 0.01}] + ([{"r": 0.5, "alpha": 1.0}] if name == "ramplus_tl" else [])
    for params in extra:
        check(name, ts, 0, params)
        check(name, [ts[2], ts[0], ts[1], ts[3]], 1, params)


# --------------------------------------------------------------------------------------- whole merges vs mergekit

def merge_configs(llama: dict, mistral: dict) -> dict[str, dict]:
    L, M = llama["models"], mistral["models"]
    cfgs = {
        "nuslerp": {"merge_method": "nuslerp", "models": _models({"models": L[1:]}, [0.3, [0.2, 0.9]])},
        "nuslerp_base_rows": {"merge_method": "nuslerp", "base_model": M[0],
                              "parameters": {"nuslerp_flatten": False},
                              "models": _models(mistral, [None, 0.6, 0.4])},
        "nuslerp_base_columns": {"merge_method": "nuslerp", "base_model": L[0],
                                 "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                                 "models": _models(llama, [None, 0.5, 0.5])},
        "multislerp": {"merge_method": "multislerp", "models": _models(llama, [0.2, 0.3, [0.5, 0.9]])},
        "multislerp_base": {"merge_method": "multislerp", "base_model": M[0],
                            "parameters": {"normalize_weights": False},
                            "models": _models(mistral, [None, 0.6, 0.4])},
        "karcher": {"merge_method": "karcher", "parameters": {"max_iter": 20},
                    "models": _models(llama)},
        "karcher_base": {"merge_method": "karcher", "base_model": M[0], "models": _models(mistral)},
        "sce": {"merge_method": "sce", "base_model": L[0], "parameters": {"select_topk": 0.4},
                "models": _models(llama)},
        "nearswap": {"merge_method": "nearswap", "base_model": M[0], "parameters": {"t": [0.001, 0.01]},
                     "models": _models({"models": M[:2]})},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": L[0], "models": _models({"models": L[:2]})},
        "ram": {"merge_method": "ram", "base_model": L[0], "parameters": {"epsilon": 0.004},
                "models": _models(llama)},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": M[0], "parameters": {"epsilon": 0.004, "r": 0.3},
                       "models": _models(mistral)},
    }
    out = {}
    for name, cfg in cfgs.items():
        out[f"{name}-float32"] = {**cfg, "dtype": "float32"}
        out[f"{name}-bfloat16"] = {**cfg, "dtype": "bfloat16"}
    return out


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    llama = _family(root, "llama", layers=4, hidden=64, intermediate=128)
    mistral = _family(root, "mistral", layers=4, hidden=64, intermediate=96, heads=4, kv_heads=2, head_dim=24)
    cfgs = merge_configs(llama, mistral)
    jobs = [(str(root / "mk" / n), c, None) for n, c in cfgs.items()]
    run_mergekit(root, jobs)
    return root, cfgs


@pytest.mark.slow
def test_merges_match_mergekit(parity):
    root, cfgs = parity
    failures = []
    for name, cfg in cfgs.items():
        want = load_all(root / "mk" / name)
        out = root / "ours" / name
        run_merge(cfg, out)
        got = load_all(out)
        assert set(got) == set(want), (name, set(got) ^ set(want))
        for key, w in want.items():
            g = got[key]
            if name in ("arcee_fusion-bfloat16", "ramplus_tl-bfloat16"):
                # mergekit writes these methods' bfloat16 merges as float32 (a float32 mask or factor promotes the
                # result); releaser writes the config dtype: the same values rounded to bfloat16
                assert w.dtype == torch.float32 and g.dtype == torch.bfloat16
                w = w.to(torch.bfloat16)
            assert g.dtype == w.dtype and g.shape == w.shape, (name, key)
            if w.dtype == torch.bfloat16:
                ok = torch.equal(g, w)
            else:
                ok = bool(((g.double() - w.double()).abs() <= 1e-6 * w.double().abs().max().clamp(min=1e-30)).all())
            if not ok:
                failures.append(f"{name}: {key} max abs diff {(g.double() - w.double()).abs().max().item():.3g}")
    assert not failures, "\n".join(failures[:20])


def test_contract_errors(parity, tmp_path):
    root, cfgs = parity
    cfg = dict(cfgs["nuslerp-float32"])
    cfg["models"] = cfg["models"][:1]
    with pytest.raises(ConfigError, match="nuslerp takes 2 models besides the base"):
        run_merge(cfg, tmp_path / "x")
    cfg = dict(cfgs["nearswap-float32"])
    cfg.pop("parameters")
    with pytest.raises(ConfigError, match="`t`"):
        run_merge(cfg, tmp_path / "x")
    cfg = dict(cfgs["sce-float32"], parameters={"select_topk": 1.5})
    with pytest.raises(ConfigError, match=r"select_topk.*\[0, 1\]"):
        run_merge(cfg, tmp_path / "x")
    cfg = dict(cfgs["karcher-float32"], parameters={"max_iter": 2.5})
    with pytest.raises(ConfigError, match="max_iter.*whole number"):
        run_merge(cfg, tmp_path / "x")
    assert not (tmp_path / "x").exists()
