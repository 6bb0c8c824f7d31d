#!/usr/bin/env bash
# The Llama-3.1-8B recipes as written, each under its card's memory cap, on full-length rows (the worst case for
# memory) with two micro-batches per step: tokens/s, MFU and peak memory for the recipe headers and
# recipes/README.md. One 80 GB GPU (measured on an H100 80GB; device kind nvidia-h200).
# Run from the repo root with the host wheelhouse carried as .whl (ONLY="NAME ..." runs just those):
#   bash benchmarks/gpu/recipes-llama.sh  (results in $OUT; committed: benchmarks/results/speed-2026-11-22.json)
# shellcheck source=benchmarks/gpu/lib.sh
source benchmarks/gpu/lib.sh
L=recipes/llama-3.1-8b
R=(--data full --warmup 2 --steps 3 --set gradient_accumulation_steps=2)
bench recipe-llama8b-qlora-style-32gb $L/qlora-style-32gb.yaml "${R[@]}" --cap-gib 32
bench recipe-llama8b-lora-8bit-rslora-24gb $L/lora-8bit-rslora-24gb.yaml "${R[@]}" --cap-gib 24
bench recipe-llama8b-qlora-conservative-24gb $L/qlora-conservative-24gb.yaml "${R[@]}" --cap-gib 24
bench recipe-llama8b-qlora-aggressive-24gb $L/qlora-aggressive-24gb.yaml "${R[@]}" --cap-gib 24
bench recipe-llama8b-lora-bf16-80gb $L/lora-bf16-80gb.yaml "${R[@]}"
