#!/usr/bin/env bash
# Build llama.cpp's server, quantizer, perplexity and tokenizer tools once, and cache them.
#
# The source is the llama.cpp tree vendored in the pinned llama-cpp-python sdist (setup/llama_cpp_source.sh).
# GGML_NATIVE=OFF: a -march=native build died with SIGILL/SIGSEGV on our CI machines.
#
# Usage: bash setup/build_llama_cpp.sh [--force] [--print-dir]
#   LOFT_CACHE (default ~/.cache/loft) holds llama.cpp/<pin>/{src,bin}; LLAMA_CPP_PYTHON_VERSION overrides the pin.
set -euo pipefail
# shellcheck source=setup/llama_cpp_source.sh
source "$(dirname "$0")/llama_cpp_source.sh"

TARGETS=(llama-server llama-quantize llama-perplexity llama-tokenize)
CACHE="${LOFT_CACHE:-$HOME/.cache/loft}"
DEST="$CACHE/llama.cpp/$LLAMA_CPP_PYTHON_VERSION"
PY="${PYTHON:-python3}"

force=0
case "${1:-}" in
  --force) force=1 ;;
  --print-dir) echo "$DEST"; exit 0 ;;
  -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
  "") ;;
  *) echo "build_llama_cpp.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
esac

# The Python tools copied from the tree: the two converters and the gguf-py they were written against (the
# tree's models/ holds only test vocabularies).
SOURCES=(convert_hf_to_gguf.py convert_lora_to_gguf.py conversion gguf-py LICENSE)
have_bins() { for t in "${TARGETS[@]}"; do [[ -x "$DEST/bin/$t" ]] || return 1; done; }
have_src() { for f in "${SOURCES[@]}"; do [[ -e "$DEST/src/$f" ]] || return 1; done; }
if [[ $force == 0 ]] && have_bins && have_src; then
  echo "llama.cpp $LLAMA_CPP_PYTHON_VERSION: cached in $DEST"
  exit 0
fi

for tool in cmake c++ make; do
  command -v "$tool" >/dev/null || { echo "build_llama_cpp.sh: $tool not found; install it (Debian: apt-get install cmake build-essential)" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "llama.cpp: fetching the llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist"
fetch_llama_cpp "$work"
src="$LLAMA_CPP_TREE"

# A cache built before a tool was added to SOURCES: copy the sources in (atomically), no 8-minute rebuild.
if [[ $force == 0 ]] && have_bins; then
  rm -rf "$DEST/.src-$$"; mkdir -p "$DEST/.src-$$"
  cp -r "${SOURCES[@]/#/$src/}" "$DEST/.src-$$/"
  rm -rf "$DEST/src"; mv "$DEST/.src-$$" "$DEST/src"
  echo "llama.cpp $LLAMA_CPP_PYTHON_VERSION: sources updated in $DEST/src"
  exit 0
fi

jobs="$(nproc)"
echo "llama.cpp: building ${TARGETS[*]} with $jobs jobs (about 8 minutes on 2 cores)"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF >"$work/configure.log" 2>&1 \
  || { tail -20 "$work/configure.log" >&2; echo "build_llama_cpp.sh: cmake configure failed" >&2; exit 1; }
cmake --build "$work/build" -j "$jobs" --target "${TARGETS[@]}" 2>&1 \
  | grep --line-buffered -E '^\[ *[0-9]+%\] (Linking|Built target)' || true
for t in "${TARGETS[@]}"; do
  [[ -x "$work/build/bin/$t" ]] || { echo "build_llama_cpp.sh: $t was not built; rerun with output: cmake --build $work/build" >&2; exit 1; }
done

# Install atomically: a half-copied cache would look complete to the check above.
stage="$CACHE/llama.cpp/.stage-$$"
rm -rf "$stage"; mkdir -p "$stage/bin"
cp "${TARGETS[@]/#/$work/build/bin/}" "$stage/bin/"
mkdir -p "$stage/src"
cp -r "${SOURCES[@]/#/$src/}" "$stage/src/"
echo "$LLAMA_CPP_PYTHON_VERSION" >"$stage/VERSION"
rm -rf "$DEST"; mv "$stage" "$DEST"
echo "llama.cpp $LLAMA_CPP_PYTHON_VERSION: built into $DEST"
