"""Peak memory of a Qwen3-MoE merge: `releaser merge` against mergekit 0.1.5 (whole processes, /usr/bin/time -v).

Two random fp32 Qwen3-MoE models (per-expert tensors, as released checkpoints and transformers' save_pretrained
have them; about 0.7 GB each at the defaults) merged with the gradient slerp of bench_merge.py. releaser reads one
output tensor's inputs at a time (experts are ordinary per-layer tensors); mergekit 0.1.5 converts each layer's
experts to transformers 5's fused [E, 2 ff, hidden] tensors first. Target: releaser's peak RSS <= 0.5x mergekit's.

    python bench/bench_moe_merge.py [--work DIR] [--hidden 512] [--layers 6] [--experts 32] [--ff 384]
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
from bench_merge import BIN, SLERP, timed, warm  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # releaser_testing: the repo's fixtures (not installed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--ff", type=int, default=384)
    args = ap.parse_args()
    from releaser_testing import noised_variant, tiny_family_model

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-moe-"))
    work.mkdir(parents=True, exist_ok=True)
    a = work / "moe-a"
    if not (a / "model.safetensors").exists():
        tiny_family_model(a, "qwen3moe", seed=0, layers=args.layers, hidden=args.hidden, heads=8, kv_heads=4,
                          num_experts=args.experts, moe_intermediate_size=args.ff, head_dim=64)
    b = noised_variant(a, work / "moe-b", seed=1)
    cfg = dict(SLERP, base_model=str(a), models=[{"model": str(a)}, {"model": str(b)}])
    cfg_path = work / "moe-slerp.yml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    size = sum(p.stat().st_size for p in a.glob("*.safetensors"))
    rows = {}
    for name, cmd, out in [("releaser", [str(BIN / "releaser"), "merge", str(cfg_path)], work / "out-releaser"),
                           ("mergekit", [str(BIN / "mergekit-yaml"), str(cfg_path)], work / "out-mergekit")]:
        shutil.rmtree(out, ignore_errors=True)
        warm([str(p) for m in (a, b) for p in sorted(m.glob("*.safetensors"))])
        os.sync()
        rows[name] = timed([*cmd, str(out), "--quiet"], env)
        shutil.rmtree(out)
    print(f"Qwen3-MoE slerp, inputs 2 x {size / 1e9:.2f} GB ({args.layers} layers, {args.experts} experts)")
    for name, (wall, rss) in rows.items():
        print(f"  {name:9s} wall {wall:7.1f} s  peak RSS {rss:5.2f} GB")
    ratio = rows["releaser"][1] / rows["mergekit"][1]
    print(f"  releaser / mergekit peak RSS: {ratio:.2f} (target <= 0.5: {'met' if ratio <= 0.5 else 'NOT met'})")


if __name__ == "__main__":
    main()
