#!/usr/bin/env bash
# The Qwen2.5-7B recipes as written, each under its card's memory cap, on full-length rows (the worst case for
# memory) with two micro-batches per step: tokens/s, MFU and peak memory for the recipe headers and
# recipes/README.md. One 80 GB GPU (measured on an H100 80GB; device kind nvidia-h200).
# Run from the repo root with the host wheelhouse carried as .whl (ONLY="NAME ..." runs just those):
#   bash benchmarks/gpu/recipes-qwen.sh  (results in $OUT; committed: benchmarks/results/speed-2026-11-22.json)
# shellcheck source=benchmarks/gpu/lib.sh
source benchmarks/gpu/lib.sh
Q=recipes/qwen2.5-7b
R=(--data full --warmup 2 --steps 3 --set gradient_accumulation_steps=2)
bench recipe-qwen7b-qlora-sft-8gb $Q/qlora-sft-8gb.yaml "${R[@]}" --cap-gib 8
bench recipe-qwen7b-qlora-sft-80gb $Q/qlora-sft-80gb.yaml "${R[@]}"
# The 12 GB DPO recipe under 11 GiB (the DPO goal's cap), against TRL's DPOTrainer uncapped (it needs ~17 GiB at
# 2,048 tokens: its speed is the bar), 5 timed steps.
bench recipe-qwen7b-dpo-qlora-12gb $Q/dpo-qlora-12gb.yaml --data full --warmup 2 --steps 5 --vs baseline \
  --cap-gib 11 --baseline-cap-gib 0 --set gradient_accumulation_steps=2
bench recipe-qwen7b-dpo-precompute-12gb $Q/dpo-qlora-precompute-12gb.yaml "${R[@]}" --cap-gib 12
