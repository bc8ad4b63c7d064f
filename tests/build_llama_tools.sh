#!/usr/bin/env bash
# Build llama.cpp's llama-quantize, llama-imatrix and llama-perplexity (test oracles) once from the llama.cpp vendored
# in the llama-cpp-python 0.3.36 sdist, and cache them. Prints the folder holding the binaries.
set -euo pipefail
sdist="${RELEASER_LLAMA_CPP_SDIST:-$HOME/.cache/releaser/llama-cpp-sdist}"
out="${RELEASER_LLAMA_TOOLS:-$HOME/.cache/releaser/llama-cpp-tools-0.3.36}"
tools="llama-quantize llama-imatrix llama-perplexity"
done=1
for t in $tools; do [ -x "$out/bin/$t" ] || done=0; done
if [ "$done" = 0 ]; then
  mkdir -p "$sdist"
  [ -f "$sdist/llama_cpp_python-0.3.36.tar.gz" ] || python -m pip download -q --no-deps --no-binary :all: \
    "llama-cpp-python==0.3.36" -d "$sdist" >&2
  src="$sdist/src"
  if [ ! -f "$src/llama_cpp_python-0.3.36/vendor/llama.cpp/CMakeLists.txt" ]; then
    rm -rf "$src" && mkdir -p "$src"
    tar xzf "$sdist/llama_cpp_python-0.3.36.tar.gz" -C "$src" llama_cpp_python-0.3.36/vendor/llama.cpp
  fi
  build="$(mktemp -d)"
  trap 'rm -rf "$build"' EXIT
  echo "building llama.cpp's $tools once (test oracles); cached in $out" >&2
  if ! { cmake -S "$src/llama_cpp_python-0.3.36/vendor/llama.cpp" -B "$build" -DCMAKE_BUILD_TYPE=Release \
          -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
          -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON -DGGML_OPENMP=OFF \
        && cmake --build "$build" -j "$(nproc)" --target $tools; } >"$build/log" 2>&1; then
    grep -iE "error|fatal" "$build/log" | tail -20 >&2
    echo "error: building llama.cpp's tools failed (cmake and a C++ compiler are needed)" >&2
    exit 1
  fi
  mkdir -p "$out.tmp/bin"
  for t in $tools; do cp "$build/bin/$t" "$out.tmp/bin/"; done
  rm -rf "$out" && mv "$out.tmp" "$out"
fi
echo "$out/bin"
