#!/usr/bin/env bash
# Dev machine, once: wheels for DeepSpeed into .whl/deepspeed/ (carried with .whl to the GPU host, ~3 MB).
# Axolotl 0.19's tiled_mlp takes its TiledMLP from deepspeed.runtime.sequence_parallel.ulysses_sp, and the host's
# wheelhouse (../shared/gpu-host/fetch-wheels.sh) has no DeepSpeed. PyPI ships DeepSpeed as an sdist only; with
# DS_BUILD_OPS=0 it builds as a pure-Python wheel (its CUDA ops are JIT-compiled on first use, and TiledMLP needs none).
# The host runs CPython 3.12, hence the platform flags for msgpack.
set -euo pipefail
DEEPSPEED_VERSION="${DEEPSPEED_VERSION:-0.19.8}"
dest=.whl/deepspeed
mkdir -p "$dest"
tmp=$(mktemp -d)
pip download -q --no-deps --no-binary :all: "deepspeed==$DEEPSPEED_VERSION" -d "$tmp"
DS_BUILD_OPS=0 pip wheel -q --no-deps --no-build-isolation "$tmp"/deepspeed-*.tar.gz -w "$dest"
pip download -q --no-deps --only-binary :all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 psutil==7.2.2 py-cpuinfo==9.0.0 einops==0.8.2 -d "$dest"
rm -rf "$tmp"
ls "$dest"
