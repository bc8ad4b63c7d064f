"""The recipe search (``gguf.quants: [{name, target: {bpw|size|kld}}]``, releaser.gguf.search):

* the choice: within the budget, no move of one tensor left that fits and lowers the KLD, within one upgrade of the
  optimum (brute force on small cases), the KLD target reached; targets no recipe reaches are one-line errors;
* the recipe entry: its target, its name and base, refused combinations.

A release with a searched recipe, reproduced by llama-quantize: tests/test_release_imatrix.py.
"""

from __future__ import annotations

import itertools
import re

import gguf
import numpy as np
import pytest

from releaser.errors import ConfigError
from releaser.gguf.mixes import quant_spec
from releaser.gguf.options import GGUFOptions
from releaser.gguf.search import Target, _hull, _patterns, choose

QT = gguf.GGMLQuantizationType


def _options(rng, n: int, k: int) -> dict:
    """n tensors with k options each: bytes increasing, predicted KLD decreasing (with a dominated one sometimes)."""
    out = {}
    for i in range(n):
        sizes = np.sort(rng.choice(np.arange(10, 200), k, replace=False))
        errs = np.sort(rng.random(k))[::-1] * rng.random() * 10
        out[f"t{i}"] = [(int(b), float(e), QT.Q4_0) for b, e in zip(sizes, errs)]
    return out


def _cost(options, chosen):
    return sum(b for n, o in options.items() for b, e, _ in o if (b, e) == chosen[n])


def test_hull_drops_dominated_and_concave_options():
    opts = [(10, 5.0, QT.Q2_K), (20, 1.0, QT.Q3_K), (15, 4.9, QT.Q4_0), (30, 0.9, QT.Q4_K), (25, 2.0, QT.Q5_0),
            (40, 0.1, QT.Q6_K)]
    assert [o[2] for o in _hull(opts)] == [QT.Q2_K, QT.Q3_K, QT.Q6_K]


@pytest.mark.parametrize("seed", range(6))
def test_budget_choice_is_within_budget_maximal_and_near_the_optimum(seed):
    rng = np.random.default_rng(seed)
    options = _options(rng, 5, 4)
    low = sum(min(b for b, _, _ in o) for o in options.values())
    high = sum(max(b for b, _, _ in o) for o in options.values())
    budget = int(rng.integers(low, high))
    # the options as types so the choice can be mapped back: one distinct type per option index
    types = [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K]
    options = {n: [(b, e, types[j]) for j, (b, e, _) in enumerate(o)] for n, o in options.items()}
    got = choose(options, Target("size", budget), fixed_bytes=0, params=1)
    pick = {n: next((b, e) for b, e, t in options[n] if t == got[n]) for n in options}
    used, kld = sum(b for b, _ in pick.values()), sum(e for _, e in pick.values())
    assert used <= budget
    best = min(sum(e for _, e in combo) for combo in itertools.product(*[[(b, e) for b, e, _ in o]
                                                                          for o in options.values()])
               if sum(b for b, _ in combo) <= budget)
    # greedy on the convex hulls: optimal up to the one upgrade that did not fit
    worst_step = max(max(e for _, e, _ in o) - min(e for _, e, _ in o) for o in options.values())
    assert best <= kld <= best + worst_step + 1e-12
    for n, o in options.items():   # no single cheaper-or-better move left that fits and lowers the KLD
        for b, e, _ in o:
            if e < pick[n][1]:
                assert used - pick[n][0] + b > budget


def test_kld_target_stops_as_soon_as_it_is_reached():
    options = {"a": [(10, 1.0, QT.Q2_K), (20, 0.2, QT.Q4_K), (40, 0.05, QT.Q8_0)],
               "b": [(10, 0.5, QT.Q2_K), (20, 0.1, QT.Q4_K), (40, 0.02, QT.Q8_0)]}
    got = choose(options, Target("kld", 0.4), fixed_bytes=0, params=1)
    assert got == {"a": QT.Q4_K, "b": QT.Q4_K}   # a first (0.08 per byte): 0.2 + 0.5 > 0.4, then b: 0.2 + 0.1
    got = choose(options, Target("kld", 0.75), fixed_bytes=0, params=1)
    assert got == {"a": QT.Q4_K, "b": QT.Q2_K}


def test_unreachable_targets_are_one_line_errors():
    options = {"a": [(10, 1.0, QT.Q2_K), (40, 0.05, QT.Q8_0)]}
    with pytest.raises(ConfigError, match=r"target KLD 0.01 is below what any recipe reaches \(predicted 0.05"):
        choose(options, Target("kld", 0.01), fixed_bytes=0, params=100)
    with pytest.raises(ConfigError, match=r"target bpw=0.5 is below the smallest recipe \(1.600 bpw"):
        choose(options, Target("bpw", 0.5), fixed_bytes=10, params=100)


def test_patterns_name_exactly_the_tensors():
    types = {"token_embd.weight": QT.Q8_0, "blk.0.attn_q.weight": QT.Q4_K, "blk.1.attn_q.weight": QT.Q5_K,
             "blk.2.attn_q.weight": QT.Q4_K, "blk.0.ffn_down.weight": QT.Q6_K, "blk.1.ffn_down.weight": QT.Q6_K,
             "blk.2.ffn_down.weight": QT.Q6_K, "output.weight": QT.Q6_K}
    pats = _patterns(types, n_layer=3)

    every = [f"blk.{i}.{r}.weight" for i in range(3) for r in ("attn_q", "attn_k", "ffn_down", "attn_output")] + \
        ["token_embd.weight", "output.weight", "output_norm.weight"]
    for name in every:
        hit = next((q for p, q in pats if re.search(p, name)), None)
        assert hit == (types[name].name if name in types else None), name


@pytest.mark.parametrize("entry, message", [
    ({"name": "Q4_K_R", "target": {"bpw": -1}}, "target bpw -1 is not a positive number"),
    ({"name": "Q4_K_R", "target": {"bpw": 4, "kld": 0.1}}, "target is one of"),
    ({"name": "Q4_K_R", "target": {"ppl": 4}}, "target is one of"),
    ({"name": "Q4_K_R", "target": {"size": "big"}}, "target size 'big' is not a positive number"),
    ({"name": "Q4_K_M", "target": {"bpw": 5}}, "cannot take a llama.cpp type's name"),
    ({"name": "Q4_K_R", "target": {"bpw": 5}, "base": "F16"}, "base F16 is not a quantized type"),
    ({"name": "Q4_K_R", "target": {"bpw": 5}, "output_type": "Q8_0"}, "output_type cannot apply to it"),
])
def test_bad_search_entries(entry, message):
    with pytest.raises(ConfigError, match=message):
        quant_spec(entry)


def test_search_entry_and_options():
    spec = quant_spec({"name": "Q4_K_R", "target": {"size": "2.1G"}})
    assert spec.searched and spec.base == "" and spec.target == Target("size", 2.1e9)
    with pytest.raises(ValueError, match="Q4_K_R searches a recipe, which needs an importance matrix"):
        GGUFOptions(quants=[{"name": "Q4_K_R", "target": {"bpw": 5}}])
    with pytest.raises(ConfigError, match="tensor_types cannot apply to it"):
        GGUFOptions(quants=[{"name": "Q4_K_R", "target": {"bpw": 5}}], imatrix="auto", tensor_types={"ffn": "q8_0"})
    assert GGUFOptions(quants=[{"name": "Q4_K_R", "target": {"bpw": 5}}], imatrix="auto").specs()[0].searched


def test_unreachable_target_in_the_stage_writes_nothing(tmp_path, smollm2):
    """The gguf stage with a target no recipe reaches: one line naming it, and no output folder."""
    import shutil

    from releaser.gguf.stage import run
    from releaser.imatrix.compute import compute_imatrix
    from releaser.imatrix.file import write
    from releaser.imatrix.options import ImatrixOptions
    from releaser_testing import tiny_model

    model = tiny_model(tmp_path / "m", layers=2, hidden=256, intermediate=512, vocab=49152)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2 / f, model / f)
    write(compute_imatrix(ImatrixOptions(chunks=2, ctx=64), model).imatrix, tmp_path / "im.gguf")
    options = GGUFOptions(quants=[{"name": "Q4_K_R", "target": {"bpw": 1.0}}], imatrix=str(tmp_path / "im.gguf"))
    with pytest.raises(ConfigError, match=r"target bpw=1 is below the smallest recipe \(\d\.\d+ bpw") as e:
        run(options, model, tmp_path / "out", name="t")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
