#!/usr/bin/env bash
# Llama-3.1-8B bf16 LoRA on an 80 GB card: tokens/s and model FLOPs utilisation (MFU), alone and against the
# hand-written TRL baseline (benchmarks/baseline_trl.py). Run names start `t2-`: the second of the four speed goals
# in benchmarks/RESULTS.md. One 80 GB GPU (measured on an H100 80GB; device kind nvidia-h200).
# Run from the repo root with the host wheelhouse carried as .whl (ONLY="NAME ..." runs just those):
#   bash benchmarks/gpu/bf16-lora-mfu.sh  (results in $OUT; committed: benchmarks/results/speed-2026-11-22.json)
# shellcheck source=benchmarks/gpu/lib.sh
source benchmarks/gpu/lib.sh
L=recipes/llama-3.1-8b
LIGER=(--set "plugins=[axolotl.integrations.liger.LigerPlugin]" --set liger_rms_norm=true --set liger_rope=true
       --set liger_glu_activation=true)

# The settings the recipe now carries, found here: no gradient checkpointing (the activations fit in 80 GB), Liger
# including the fused linear cross-entropy, no LoRA dropout (it keeps a copy of every projection's input), two
# packed 4,096-token rows per micro-batch. The profiler's top kernels go into the result.
bench t2-llama8b-lora-bf16-nogc $L/lora-bf16-80gb.yaml --warmup 2 --steps 4 --profile "${LIGER[@]}" \
  --set liger_fused_linear_cross_entropy=true --set gradient_checkpointing=false --set lora_dropout=0 \
  --set micro_batch_size=2 --set gradient_accumulation_steps=1

# The recipe as written against TRL SFTTrainer + PEFT bf16 LoRA at the same tokens per step.
bench t2-llama8b-lora-bf16-vs-baseline $L/lora-bf16-80gb.yaml --vs baseline --warmup 2 --steps 4 \
  --set gradient_accumulation_steps=1
# The same on full-length rows: with 188-token Shakespeare rows most of the ratio above is packing (the baseline
# runs 22 micro-batches of 2 short rows per step); with every row 4,096 tokens both runners see the same batches.
bench t2-llama8b-lora-bf16-full-vs-baseline $L/lora-bf16-80gb.yaml --data full --vs baseline --warmup 2 --steps 4 \
  --set gradient_accumulation_steps=1
