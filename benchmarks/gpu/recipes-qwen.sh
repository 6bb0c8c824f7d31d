#!/usr/bin/env bash
# GPU host: the Qwen2.5-7B recipes as written, each under its card's memory cap (issue #3), and target 3 —
# DPO at 2,048 tokens against TRL's DPOTrainer with the adapter-disabled reference (issue #8).
# Run from the repo root with .whl carried:  bash benchmarks/gpu/recipes-qwen.sh   (results in $OUT)
# shellcheck source=benchmarks/gpu/lib.sh
source benchmarks/gpu/lib.sh
Q=recipes/qwen2.5-7b
R=(--data full --warmup 2 --steps 3 --set gradient_accumulation_steps=2)  # full-length rows: the worst case
bench recipe-qwen7b-qlora-sft-8gb $Q/qlora-sft-8gb.yaml "${R[@]}" --cap-gib 8
# Target 3 without lora_*_kernel (Axolotl 0.19 patches them before TRL wraps the DPO model: "Model must be a
# PeftModelForCausalLM"); Liger's fused DPO loss keeps the logits of policy and reference out of memory.
bench t3-qwen7b-dpo-2048 $Q/dpo-qlora-12gb.yaml --data full --warmup 2 --steps 3 --vs baseline --cap-gib 11 \
  --set sequence_len=2048 --set gradient_accumulation_steps=2 \
  --set "plugins=[axolotl.integrations.liger.LigerPlugin]" --set liger_rms_norm=true --set liger_rope=true \
  --set liger_glu_activation=true --set dpo_use_liger_kernel=true
bench recipe-qwen7b-qlora-sft-80gb $Q/qlora-sft-80gb.yaml "${R[@]}"
bench recipe-qwen7b-dpo-precompute-12gb $Q/dpo-qlora-precompute-12gb.yaml "${R[@]}" --cap-gib 12
