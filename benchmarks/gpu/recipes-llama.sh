#!/usr/bin/env bash
# GPU host: the Llama-3.1-8B recipes as written, each under its card's memory cap (issue #3).
# Run from the repo root with .whl carried:  bash benchmarks/gpu/recipes-llama.sh   (results in $OUT)
# shellcheck source=benchmarks/gpu/lib.sh
source benchmarks/gpu/lib.sh
L=recipes/llama-3.1-8b
R=(--data full --warmup 2 --steps 3 --set gradient_accumulation_steps=2)  # full-length rows: the worst case
bench recipe-llama8b-qlora-style-32gb $L/qlora-style-32gb.yaml "${R[@]}" --cap-gib 32
bench recipe-llama8b-lora-8bit-rslora-24gb $L/lora-8bit-rslora-24gb.yaml "${R[@]}" --cap-gib 24
bench recipe-llama8b-qlora-conservative-24gb $L/qlora-conservative-24gb.yaml "${R[@]}" --cap-gib 24
bench recipe-llama8b-qlora-aggressive-24gb $L/qlora-aggressive-24gb.yaml "${R[@]}" --cap-gib 24
bench recipe-llama8b-lora-bf16-80gb $L/lora-bf16-80gb.yaml "${R[@]}"
