#!/usr/bin/env bash
# Qwen2.5-7B QLoRA SFT under a 12 GiB memory cap: Loft against the hand-written TRL baseline
# (benchmarks/baseline_trl.py) at the same tokens per optimizer step. Run names start `t1-`: the first of the four
# speed goals in benchmarks/RESULTS.md. One 80 GB GPU (measured on an H100 80GB; device kind nvidia-h200).
# Run from the repo root with the host wheelhouse carried as .whl (ONLY="NAME ..." runs just those):
#   bash benchmarks/gpu/qlora-sft-vs-trl.sh  (results in $OUT; committed: benchmarks/results/speed-2026-11-22.json)
# shellcheck source=benchmarks/gpu/lib.sh
source benchmarks/gpu/lib.sh
Q=recipes/qwen2.5-7b

# Shakespeare-shaped rows packed into 8,192-token sequences, one micro-batch per optimizer step; the baseline
# accumulates as many unpacked rows (the same tokens per step).
bench t1-qwen7b-qlora-cap12 $Q/qlora-sft-8gb.yaml --cap-gib 12 --vs baseline --warmup 2 --steps 3 \
  --set sample_packing=true --set sequence_len=8192 --set gradient_accumulation_steps=1
# Loft's side again, alone, to record its peak memory (the run above lost it to Axolotl's resets of the counter).
bench t1-qwen7b-qlora-cap12-peak $Q/qlora-sft-8gb.yaml --cap-gib 12 --only loft --warmup 2 --steps 3 \
  --set sample_packing=true --set sequence_len=8192 --set gradient_accumulation_steps=1

# On full-length rows: the ratio above is mostly packing (the baseline runs 43 short rows per step). With every
# row 8,192 tokens both runners see the same batches; a baseline that does not fit 12 GiB is timed uncapped.
bench t1-qwen7b-qlora-12gb-full-vs-baseline $Q/qlora-sft-12gb.yaml --data full --vs baseline --warmup 2 --steps 3 \
  --cap-gib 12 --set gradient_accumulation_steps=1
if [[ $(field t1-qwen7b-qlora-12gb-full-vs-baseline baseline status) == does_not_fit ]]; then
  bench t1-qwen7b-qlora-12gb-full-baseline-nocap $Q/qlora-sft-12gb.yaml --data full --only baseline --warmup 2 \
    --steps 3 --set gradient_accumulation_steps=1
fi

# The 12 GB recipe as written, with 4 warm-up steps: with 2, the baseline's step times were still falling during
# the timed steps (39.6, 30.3 | 29.9, 25.5, 22.1 s).
bench t1-qwen7b-qlora-12gb-vs-baseline $Q/qlora-sft-12gb.yaml --vs baseline --warmup 4 --steps 4 --cap-gib 12
