"""Benchmark LoRA folding: the same `releaser merge` with and without a LoRA source (whole processes,
/usr/bin/time -v), and mergekit 0.1.5's `model+lora` (which merges the adapter into a full copy first).

Inputs: two fp32 SmolLM2-135M variants and a random peft LoRA (r=16 on every attention and MLP projection) made on the
first; linear merge in float32. Target: folding adds <= 20% wall time to the merge without the LoRA.

    python bench/bench_merge_lora.py [--work DIR] [--repeat N] [--no-mergekit]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import BIN, timed, warm, weights  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # releaser_testing: the repo's fixtures (not installed)


def make_adapter(base: Path, out: Path) -> Path:
    if (out / "adapter_model.safetensors").exists():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False))
    model.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-mergekit", action="store_true")
    args = ap.parse_args()
    from releaser_testing import cache_dir, noised_variant, smollm2_dir

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-lora-"))
    work.mkdir(parents=True, exist_ok=True)
    base = smollm2_dir()
    a = noised_variant(base, cache_dir() / "smollm2-variant-a", seed=1)
    b = noised_variant(base, cache_dir() / "smollm2-variant-b", seed=2)
    lora = make_adapter(a, cache_dir() / "smollm2-bench-lora")
    plain = {"merge_method": "linear", "dtype": "float32",
             "models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}]}
    folded = yaml.safe_load(yaml.safe_dump(plain))
    folded["models"][0]["lora"] = {"path": str(lora), "weight": 0.25}
    mk = yaml.safe_load(yaml.safe_dump(plain))
    mk["models"][0]["model"] = f"{a}+{lora}"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    results: dict[str, list[tuple[float, float]]] = {"releaser": [], "releaser+LoRA": [], "mergekit+LoRA": []}
    for i in range(args.repeat):
        for name, cfg in (("releaser", plain), ("releaser+LoRA", folded)):
            path = work / f"{name}.yml"
            path.write_text(yaml.safe_dump(cfg))
            out = work / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            warm(weights(a) + weights(b))
            results[name].append(timed([str(BIN / "releaser"), "merge", str(path), str(out), "--quiet"], env))
            shutil.rmtree(out, ignore_errors=True)
    if not args.no_mergekit:
        path = work / "mergekit.yml"
        path.write_text(yaml.safe_dump(mk))
        cache = work / "lora-cache"
        shutil.rmtree(cache, ignore_errors=True)
        results["mergekit+LoRA"].append(timed([str(BIN / "mergekit-yaml"), str(path), str(work / "out-mk"), "--quiet",
                                               "--lora-merge-cache", str(cache)], env))
        shutil.rmtree(work / "out-mk", ignore_errors=True)
    print(f"\n== linear merge of two fp32 SmolLM2-135M, LoRA r=16 on all projections (best of {args.repeat})")
    print(f"{'':15} {'wall s':>8} {'peak RSS GB':>12}")
    best = {k: min(v) for k, v in results.items() if v}
    for name, (wall, rss) in best.items():
        print(f"{name:15} {wall:8.2f} {rss:12.2f}")
    print(f"LoRA folding overhead: {best['releaser+LoRA'][0] / best['releaser'][0] - 1:+.0%} wall (target <= +20%)")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
