#!/usr/bin/env bash
# Run the whole test suite. Installs what it needs into .venv first (torch==2.13.0, releaser[test], and the
# llama.cpp oracle llama-cpp-python, built from source once (~10 min) and cached as a wheel).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source .ci/env.sh
wheels="${RELEASER_WHEEL_CACHE:-$HOME/.cache/releaser/wheels}"
if ! python -c "import llama_cpp" 2>/dev/null; then
  if ! ls "$wheels"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python 0.3.36 (test oracle) once; cached in $wheels"
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" python -m pip wheel -q --no-deps "llama-cpp-python==0.3.36" -w "$wheels"
  fi
  python -m pip install -q --find-links "$wheels" "llama-cpp-python==0.3.36" 2>&1 | grep -v '^WARNING: Location' || true
fi
# llama.cpp's own convert_hf_to_gguf.py (the per-family GGUF oracle), vendored in the llama-cpp-python 0.3.36 sdist
sdist="${RELEASER_LLAMA_CPP_SDIST:-$HOME/.cache/releaser/llama-cpp-sdist}"
if [ -z "${RELEASER_LLAMA_CPP_DIR:-}" ] && [ ! -f "$sdist/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
  mkdir -p "$sdist"
  [ -f "$sdist/llama_cpp_python-0.3.36.tar.gz" ] || python -m pip download -q --no-deps --no-binary :all: \
    "llama-cpp-python==0.3.36" -d "$sdist" 2>&1 | grep -v '^WARNING: Location' || true
  tar xzf "$sdist/llama_cpp_python-0.3.36.tar.gz" -C "$sdist" llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py \
    llama_cpp_python-0.3.36/vendor/llama.cpp/conversion llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py
fi
# AutoAWQ 0.2.9 (the AWQ tests' independent GEMM reader) without its triton/datasets requirements, which it does not use
python -c "import awq" 2>/dev/null || python -m pip install -q --no-deps "autoawq==0.2.9" 2>&1 | grep -v '^WARNING: Location' || true
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
python -m pytest -q "$@"
