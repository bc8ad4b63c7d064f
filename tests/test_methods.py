"""Merge methods checked against mergekit 0.1.5 (the oracle) on random tensors, called the way the engine calls them."""

from __future__ import annotations

import pytest
import torch

from releaser.errors import ConfigError
from releaser.merge.methods import REQUIRED, get_method, method_names
from releaser.merge.methods.sparsify import SPARSIFIERS


def ours(name, tensors, base_index=None, params=None, per_model=None, seed=None):
    """Call our method like the engine does: defaults filled in, the base's entry without required keys."""
    method = get_method(name)
    glob = {**method.global_params, **(params or {})}
    per_model = per_model or [{} for _ in tensors]
    model_params = []
    for i, given in enumerate(per_model):
        entry = {**method.model_params, **given}
        if i == base_index:
            entry = {k: v for k, v in entry.items() if v is not REQUIRED}
        model_params.append(entry)
    generator = torch.Generator().manual_seed(seed) if method.random else None
    return method.fn(list(tensors), base_index, glob, model_params, generator)


def theirs(name, tensors, base_index=None, params=None, per_model=None, seed=None, dtype=None):
    """mergekit 0.1.5 on the same inputs; random methods draw from the global RNG, seeded like our generator."""
    from mergekit.merge_methods.api import merge_tensors

    kwargs = dict(params or {})
    per_model = per_model or [{} for _ in tensors]
    for key in {k for p in per_model for k in p}:
        kwargs[key] = {i: p[key] for i, p in enumerate(per_model) if key in p}
    if seed is not None:
        torch.manual_seed(seed)
    return merge_tensors(list(tensors), name, parameters=kwargs, base_index=base_index, dtype=dtype)


def rel_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> bool:
    a, b = a.double(), b.double()
    scale = max(b.abs().max().item(), 1e-30)
    return bool(((a - b).abs() <= rel * scale).all()) and a.shape == b.shape


def random_models(n, shape, dtype=torch.float32, seed=0, noise=0.02):
    """A base tensor and n-1 noised variants (like fine-tunes of one base)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    out = [base] + [base + noise * torch.randn(shape, generator=g) for _ in range(n - 1)]
    return [t.to(dtype) for t in out]


# ---------------------------------------------------------------------------------------------------------- registry

ALL = ["linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
       "della", "della_linear", "model_stock", "passthrough"]


def test_registry_declares_mergekit_parameters_and_defaults():
    from mergekit import merge_methods
    from mergekit.merge_methods.base import MISSING, ParameterScope

    assert set(ALL) <= set(method_names())
    for name in ALL:
        ours_m = get_method(name)
        spec = merge_methods.get(name).spec
        assert ours_m.pretty_name == spec.pretty_name
        assert ours_m.description and ours_m.reference_url.startswith("https://")
        declared = {**ours_m.global_params, **ours_m.model_params}
        assert set(declared) == {p.name for p in spec.parameters}, name
        for p in spec.parameters:
            assert (p.scope == ParameterScope.SHARED) == (p.name in ours_m.global_params), (name, p.name)
            expected = REQUIRED if p.default is MISSING else p.default
            assert declared[p.name] == expected or declared[p.name] is expected, (name, p.name)
        contract = spec.contract
        assert ours_m.min_models == contract.min_inputs, name
        assert ours_m.max_models == contract.max_inputs, name
        assert (ours_m.base == "required") == (contract.base.value == "required"), name
    assert [m for m in ALL if get_method(m).random] == ["dare_ties", "dare_linear", "della", "della_linear"]


# ---------------------------------------------------------------------------------------------------------- linear

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_mergekit(dtype, normalize):
    tensors = random_models(3, (48, 40), dtype, seed=1)
    per = [{"weight": 0.3}, {"weight": 0.5}, {"weight": 0.7}]
    got = ours("linear", tensors, None, {"normalize": normalize}, per)
    want = theirs("linear", tensors, None, {"normalize": normalize}, per)
    assert got.dtype == dtype
    assert torch.equal(got, want)


def test_linear_vector_and_scalar_shapes():
    for shape in [(64,), ()]:
        tensors = random_models(2, shape, seed=2)
        per = [{"weight": 1.0}, {"weight": 3.0}]
        assert torch.equal(ours("linear", tensors, None, {}, per), theirs("linear", tensors, None, {}, per))


def test_linear_base_needs_a_weight():
    tensors = random_models(2, (4, 4))
    with pytest.raises(ConfigError, match="weight"):
        ours("linear", tensors, 0, {}, [{}, {"weight": 1.0}])


# ---------------------------------------------------------------------------------------------------------- slerp

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.7, 1.0])
def test_slerp_matches_mergekit(dtype, t):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(96, 80, generator=g).to(dtype), torch.randn(96, 80, generator=g).to(dtype)
    for base_index, tensors in [(0, [a, b]), (1, [b, a])]:
        got = ours("slerp", tensors, base_index, {"t": t})
        want = theirs("slerp", tensors, base_index, {"t": t})
        assert got.dtype == dtype
        assert torch.equal(got, want)
    if t == 0.0:
        assert torch.equal(ours("slerp", [a, b], 0, {"t": t}), a)


def test_slerp_chunked_large_tensor_bit_identical():
    # more than one 1M-element chunk, with a ragged last chunk: the float32 accumulation order must match
    g = torch.Generator().manual_seed(4)
    a = torch.randn(1100, 1000, generator=g)
    b = a + 0.5 * torch.randn(1100, 1000, generator=g)
    got = ours("slerp", [a, b], 0, {"t": 0.3})
    assert torch.equal(got, theirs("slerp", [a, b], 0, {"t": 0.3}))
    bf = [a.bfloat16(), b.bfloat16()]
    assert torch.equal(ours("slerp", bf, 0, {"t": 0.3}), theirs("slerp", bf, 0, {"t": 0.3}))


def test_slerp_parallel_antiparallel_and_zero_use_lerp():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(32, 16, generator=g)
    for other in [2 * a, -a, torch.zeros_like(a)]:
        got = ours("slerp", [a, other], 0, {"t": 0.25})
        assert torch.equal(got, theirs("slerp", [a, other], 0, {"t": 0.25}))
        assert torch.isfinite(got).all()
    assert torch.allclose(ours("slerp", [a, 2 * a], 0, {"t": 0.25}), 1.25 * a)
    zeros = torch.zeros(8, 8)
    assert torch.equal(ours("slerp", [zeros, zeros], 0, {"t": 0.5}), zeros)
    empty = torch.zeros(0, 4)
    assert ours("slerp", [empty, empty], 0, {"t": 0.5}).shape == (0, 4)


def test_slerp_single_input_passes_through():
    a = torch.randn(4, 4)
    assert ours("slerp", [a], 0, {"t": 0.5}) is a


# ------------------------------------------------------------------------------------------------- task arithmetic

DETERMINISTIC_GTA = ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"]
RANDOM_GTA = ["dare_ties", "dare_linear", "della", "della_linear"]


def _gta_per_model(name, n, density=0.4):
    per = [{}]
    for i in range(1, n):
        entry = {"weight": [0.3, 0.5, 0.7, 1.1][i - 1], "density": density}
        if name.startswith("breadcrumbs"):
            entry["gamma"] = 0.05
        if name.startswith("della"):
            entry["epsilon"] = 0.1
        per.append(entry)
    return per


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", DETERMINISTIC_GTA + RANDOM_GTA)
def test_task_arithmetic_family_matches_mergekit(name, dtype):
    tensors = random_models(4, (64, 48), dtype, seed=6)
    per = _gta_per_model(name, 4)
    for params in [{}, {"normalize": True, "lambda": 0.8}, {"rescale": False, "int8_mask": True},
                   {"normalize": False, "rescale": True}]:
        got = ours(name, tensors, 0, params, per, seed=11)
        want = theirs(name, tensors, 0, params, per, seed=11)
        assert got.dtype == dtype
        assert torch.equal(got, want), (name, params)


@pytest.mark.parametrize("name", DETERMINISTIC_GTA + RANDOM_GTA)
def test_task_arithmetic_family_base_not_first_and_vectors(name):
    tensors = random_models(3, (40,), seed=7)
    per = _gta_per_model(name, 3)
    order = [1, 0, 2]  # base in the middle
    tensors = [tensors[i] for i in order]
    per = [per[i] for i in order]
    got = ours(name, tensors, 1, {}, per, seed=3)
    want = theirs(name, tensors, 1, {}, per, seed=3)
    assert rel_close(got, want)


@pytest.mark.parametrize("name", DETERMINISTIC_GTA + RANDOM_GTA)
def test_task_arithmetic_family_edge_cases(name):
    base = torch.randn(16, 16)
    # identical models: zero task vectors give back the base
    assert torch.equal(ours(name, [base, base.clone(), base.clone()], 0, {}, _gta_per_model(name, 3), seed=1), base)
    # only the base present
    assert ours(name, [base], 0, {}, [{}], seed=1) is base
    # density 1 keeps everything: equal to task arithmetic with the same normalize setting
    tensors = random_models(3, (16, 16), seed=8)
    per = [{}] + [{**p, "density": 1.0} for p in _gta_per_model(name, 3)[1:]]
    normalize = get_method(name).global_params["normalize"]
    if name not in ("ties", "breadcrumbs_ties", "dare_ties", "della"):
        ta = ours("task_arithmetic", tensors, 0, {"normalize": normalize}, per)
        assert torch.allclose(ours(name, tensors, 0, {}, per, seed=1), ta)
    assert torch.equal(ours(name, tensors, 0, {}, per, seed=1), theirs(name, tensors, 0, {}, per, seed=1))


def test_task_arithmetic_lambda_and_weights_in_bfloat16():
    base = torch.zeros(4, dtype=torch.bfloat16)
    other = torch.ones(4, dtype=torch.bfloat16)
    out = ours("task_arithmetic", [base, other], 0, {}, [{}, {"weight": 0.3}])
    assert out.tolist() == [0.30078125] * 4  # the weight is quantised to bfloat16, as in mergekit
    out = ours("task_arithmetic", [base, other], 0, {"lambda": 2.0}, [{}, {"weight": 0.5}])
    assert out.tolist() == [1.0] * 4


def test_ties_sign_consensus():
    base = torch.zeros(1000)
    g = torch.Generator().manual_seed(9)
    tensors = [base] + [torch.randn(1000, generator=g) for _ in range(3)]
    per = [{}] + [{"weight": 1.0, "density": 1.0}] * 3
    out = ours("ties", tensors, 0, {}, per)
    deltas = torch.stack(tensors[1:])
    elected = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(deltas) == elected
    # normalised: the mean of the deltas that agree with the elected sign
    assert torch.allclose(out, (deltas * agree).sum(0) / agree.sum(0))
    assert ((torch.sign(out) == elected) | (out == 0)).all()


@pytest.mark.parametrize("density", [0.1, 0.35, 0.9])
def test_ties_keeps_top_k_magnitudes(density):
    g = torch.Generator().manual_seed(10)
    delta = torch.randn(50, 40, generator=g)
    out = ours("ties", [torch.zeros_like(delta), delta], 0, {}, [{}, {"weight": 1.0, "density": density}])
    k = max(1, int(density * delta.numel()))
    assert int((out != 0).sum()) == k
    assert out.abs().min() == 0 and (out != 0).sum() == k
    threshold = delta.abs().flatten().sort(descending=True).values[k - 1]
    assert torch.equal(out != 0, delta.abs() >= threshold)


def test_breadcrumbs_drops_outliers_and_small_values():
    delta = torch.arange(1, 101, dtype=torch.float32)  # magnitudes 1..100
    out = ours("breadcrumbs", [torch.zeros(100), delta], 0, {}, [{}, {"weight": 1.0, "density": 0.5, "gamma": 0.1}])
    kept = out.nonzero().flatten().tolist()
    assert kept == list(range(40, 90))  # drop the 40 smallest and the 10 largest
    # gamma 0 keeps the top `density` fraction (0.1.5 behaviour, not the old empty slice)
    out = ours("breadcrumbs", [torch.zeros(100), delta], 0, {}, [{}, {"weight": 1.0, "density": 0.3, "gamma": 0.0}])
    assert out.nonzero().flatten().tolist() == list(range(70, 100))


# ---------------------------------------------------------------------------------------------------------- randomness

@pytest.mark.parametrize("name", RANDOM_GTA)
def test_random_methods_reproducible(name):
    tensors = random_models(3, (64, 64), seed=12)
    per = _gta_per_model(name, 3)
    first = ours(name, tensors, 0, {}, per, seed=5)
    assert torch.equal(first, ours(name, tensors, 0, {}, per, seed=5))
    assert not torch.equal(first, ours(name, tensors, 0, {}, per, seed=6))


@pytest.mark.parametrize("sparsifier", ["random", "della_magprune"])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.8])
def test_random_sparsifiers_keep_density_and_l1_norm(sparsifier, density):
    g = torch.Generator().manual_seed(13)
    delta = torch.randn(200, 500, generator=g)
    out = SPARSIFIERS[sparsifier](delta, density, True, epsilon=0.1, generator=torch.Generator().manual_seed(1))
    kept = (out != 0).float().mean().item()
    assert abs(kept - density) < 0.01
    assert torch.allclose(out.abs().sum(), delta.abs().sum(), rtol=1e-4)  # L1 rescale, not 1/density
    unscaled = SPARSIFIERS[sparsifier](delta, density, False, epsilon=0.1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(unscaled != 0, out != 0) and torch.equal(unscaled[unscaled != 0], delta[unscaled != 0])


def test_della_prefers_large_magnitudes_and_validates_epsilon():
    g = torch.Generator().manual_seed(14)
    delta = torch.randn(100, 1000, generator=g)
    out = SPARSIFIERS["della_magprune"](delta, 0.5, False, epsilon=0.3, generator=torch.Generator().manual_seed(2))
    ranks = delta.abs().argsort(dim=1).argsort(dim=1)
    low, high = ranks < 200, ranks >= 800
    assert abs((out[low] != 0).float().mean().item() - 0.26) < 0.02   # about density - epsilon (+ 0.2 * 2 * epsilon)
    assert abs((out[high] != 0).float().mean().item() - 0.74) < 0.02
    with pytest.raises(ConfigError, match="epsilon"):
        SPARSIFIERS["della_magprune"](delta, 0.9, False, epsilon=0.15)


def test_della_single_element_rows_and_scalars():
    # mergekit 0.1.5 fails on these (0/0 rank normalisation); releaser keeps them with probability = density
    gen = torch.Generator().manual_seed(3)
    column = torch.randn(400, 1, generator=gen)
    out = SPARSIFIERS["della_magprune"](column, 0.5, False, epsilon=0.1, generator=gen)
    assert 0.35 < (out != 0).float().mean().item() < 0.65
    for name in DETERMINISTIC_GTA + RANDOM_GTA:
        given = {"weight": 1.0, "density": 0.5, "epsilon": 0.1, "gamma": 0.0}
        per = [{}, {k: v for k, v in given.items() if k in get_method(name).model_params}]
        out = ours(name, [torch.tensor(1.0), torch.tensor(2.0)], 0, {}, per, seed=1)
        assert out.shape == () and torch.isfinite(out)


def test_sparsifiers_density_edges():
    delta = torch.randn(10, 10)
    for name, fn in SPARSIFIERS.items():
        assert fn(delta, 1.0, True) is delta
    assert torch.equal(SPARSIFIERS["magnitude"](delta, 0.0, True), torch.zeros_like(delta))
    assert int((SPARSIFIERS["magnitude"](delta, 0.001, False) != 0).sum()) == 1  # k = max(1, int(d * n))
    assert torch.equal(SPARSIFIERS["della_magprune"](delta, 0.0, True), torch.zeros_like(delta))


# ---------------------------------------------------------------------------------------------------------- model stock

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("n", [3, 4])
def test_model_stock_matches_mergekit(dtype, filter_wise, n):
    for shape in [(32, 24), (24,)]:
        tensors = random_models(n, shape, dtype, seed=15)
        got = ours("model_stock", tensors, 0, {"filter_wise": filter_wise})
        want = theirs("model_stock", tensors, 0, {"filter_wise": filter_wise})
        assert got.dtype == dtype
        assert torch.equal(got, want)


def test_model_stock_identical_offsets_give_the_average():
    base = torch.randn(8, 8)
    offset = torch.randn(8, 8)
    out = ours("model_stock", [base, base + offset, base + offset], 0, {})
    assert torch.allclose(out, base + offset, atol=1e-5)  # cos = 1 -> t = 1
    out = ours("model_stock", [base, base + offset, base - offset], 0, {})
    assert torch.equal(out, base)  # cos = -1 -> singular: keep the base


# ---------------------------------------------------------------------------------------------------------- passthrough

def test_passthrough_and_scale():
    a = torch.randn(5, 5)
    assert ours("passthrough", [a], None, {}, [{}]) is a
    assert torch.equal(ours("passthrough", [a], None, {}, [{"scale": 0.5}]), theirs("passthrough", [a], None, {},
                                                                                   [{"scale": 0.5}]))
