#!/usr/bin/env bash
# GPU host, NOT RUN YET (the 2026-11-22 session's device time ran out): the measurements still owed, in order.
# Run from the repo root with .whl carried:  bash benchmarks/gpu/next.sh   (about 10 minutes; results in $OUT)
# shellcheck source=benchmarks/gpu/lib.sh
source benchmarks/gpu/lib.sh
LIGER=(--set "plugins=[axolotl.integrations.liger.LigerPlugin]" --set liger_rms_norm=true --set liger_rope=true
       --set liger_glu_activation=true)
Q=recipes/qwen2.5-7b
L=recipes/llama-3.1-8b

# Target 3 again without lora_*_kernel (Axolotl 0.19 patches them before TRL wraps the DPO model:
# "Model must be a PeftModelForCausalLM"). Liger's fused DPO loss keeps the logits out of memory.
bench t3-qwen7b-dpo-2048 $Q/dpo-qlora-12gb.yaml --data full --warmup 2 --steps 3 --vs baseline --profile \
  --set sequence_len=2048 --set gradient_accumulation_steps=2 "${LIGER[@]}" --set dpo_use_liger_kernel=true

# Target 4: the MLP of one layer at 24K tokens is what overflowed; tiled_mlp computes it in sequence shards.
LONG=(--cap-gib 12 --data full --warmup 1 --steps 2 "${LIGER[@]}" --set liger_fused_linear_cross_entropy=true
      --set sample_packing=true --set micro_batch_size=1 --set gradient_accumulation_steps=1 --set lora_dropout=0
      --set activation_offloading=true --set tiled_mlp=true --set embeddings_skip_upcast=true)
bench t4-llama8b-qlora-24k-tiled-cap12 $L/qlora-conservative-24gb.yaml "${LONG[@]}" --set sequence_len=24576
bench t4-llama8b-qlora-32k-tiled-cap12 $L/qlora-conservative-24gb.yaml "${LONG[@]}" --set sequence_len=32768

# Target 1's Loft run again: its peak memory was lost to Axolotl's counter resets (fixed in speed_probe.py).
bench t1-qwen7b-qlora-cap12 $Q/qlora-sft-8gb.yaml --cap-gib 12 --only loft --warmup 2 --steps 3 \
  --set sample_packing=true --set sequence_len=8192 --set gradient_accumulation_steps=1

# Recipes as written (full-length rows, two micro-batches per step), under their card's cap.
R=(--data full --warmup 2 --steps 3 --set gradient_accumulation_steps=2)
bench recipe-qwen7b-qlora-sft-8gb-skip-upcast $Q/qlora-sft-8gb.yaml "${R[@]}" --cap-gib 8 \
  --set embeddings_skip_upcast=true
bench recipe-qwen7b-qlora-sft-80gb $Q/qlora-sft-80gb.yaml "${R[@]}"
bench recipe-qwen7b-dpo-precompute-12gb $Q/dpo-qlora-precompute-12gb.yaml "${R[@]}" --cap-gib 12
bench recipe-llama8b-lora-bf16-80gb $L/lora-bf16-80gb.yaml "${R[@]}"
bench recipe-llama8b-lora-8bit-rslora-24gb $L/lora-8bit-rslora-24gb.yaml "${R[@]}" --cap-gib 24
bench recipe-llama8b-qlora-conservative-24gb $L/qlora-conservative-24gb.yaml "${R[@]}" --cap-gib 24
bench recipe-llama8b-qlora-aggressive-24gb $L/qlora-aggressive-24gb.yaml "${R[@]}" --cap-gib 24
bench recipe-llama8b-qlora-style-32gb $L/qlora-style-32gb.yaml "${R[@]}" --cap-gib 32
if [[ -f setup/verify ]] && (( SECONDS < DEADLINE )); then
  timeout 60 python3 setup/verify --json > "$OUT/gpu-verify.json" || echo "setup/verify failed or timed out"
fi
