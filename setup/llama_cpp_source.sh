#!/usr/bin/env bash
# Which llama.cpp Loft builds, and where its source comes from; sourced by setup/build_llama_cpp.sh (the tools)
# and setup/build_llama_ui.sh (the chat page), and the pin read by training/llama_cpp.py.
#
# llama.cpp is not packaged for Debian 12, and nothing but package registries is reachable, so the source comes
# from the llama-cpp-python sdist on PyPI, which vendors a full llama.cpp tree (the pin fixes which one).
# LLAMA_CPP_PYTHON_VERSION overrides the pin.

LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"

# fetch_llama_cpp WORK [PART]: download the sdist into WORK and unpack its llama.cpp tree (only PART of it, a
# folder inside the tree, when given); LLAMA_CPP_TREE is then the tree's folder. $PY runs pip (default python3).
fetch_llama_cpp() {
  local work="$1" part="${2:-}"
  "${PY:-python3}" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" \
    -d "$work" || return 1
  if [[ -n $part ]]; then
    tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work" --wildcards "*/vendor/llama.cpp/$part/*" || return 1
  else
    tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work" || return 1
  fi
  # shellcheck disable=SC2034  # read by the script that sourced this file
  LLAMA_CPP_TREE="$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)"
}
