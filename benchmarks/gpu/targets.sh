#!/usr/bin/env bash
# GPU host: target 3 (Qwen2.5-7B DPO QLoRA at 2,048 tokens vs TRL DPOTrainer), target 2 (Llama-3.1-8B bf16 LoRA
# MFU), target 4 (Llama-3.1-8B QLoRA: longest sequence inside a 12 GiB cap), then the bf16 recipe as written.
# Run from the repo root with .whl carried:  bash benchmarks/gpu/targets.sh   (results in $OUT)
# shellcheck source=benchmarks/gpu/lib.sh
source benchmarks/gpu/lib.sh
LIGER=(--set "plugins=[axolotl.integrations.liger.LigerPlugin]" --set liger_rms_norm=true --set liger_rope=true
       --set liger_glu_activation=true)
KERNELS=(--set lora_mlp_kernel=true --set lora_qkv_kernel=true --set lora_o_kernel=true)

# Target 3: full-length pairs at 2,048 tokens, two pairs per step for both runners. Loft = the recipe plus
# Liger's fused DPO loss (no logits for policy or reference), Liger layers and the fused LoRA kernels.
bench t3-qwen7b-dpo-2048 recipes/qwen2.5-7b/dpo-qlora-12gb.yaml --data full --warmup 2 --steps 3 --vs baseline \
  --set sequence_len=2048 --set gradient_accumulation_steps=2 "${LIGER[@]}" "${KERNELS[@]}" \
  --set dpo_use_liger_kernel=true --profile

# Target 2: bf16 LoRA, no gradient checkpointing (activations fit in 80 GB), Liger incl. the fused linear
# cross-entropy, fused LoRA kernels (no dropout), two packed 4,096-token rows per micro-batch.
L=recipes/llama-3.1-8b
bench t2-llama8b-lora-bf16-nogc $L/lora-bf16-80gb.yaml --warmup 2 --steps 4 --profile "${LIGER[@]}" \
  --set liger_fused_linear_cross_entropy=true --set gradient_checkpointing=false --set lora_dropout=0 \
  --set micro_batch_size=2 --set gradient_accumulation_steps=1

# Target 4: one full-length document per step inside 12 GiB: checkpointed layer inputs offloaded to CPU, Liger,
# no LoRA dropout (it keeps a copy of every projection's input).
LONG=(--cap-gib 12 --data full --warmup 1 --steps 2 "${LIGER[@]}" --set liger_fused_linear_cross_entropy=true
      --set sample_packing=true --set micro_batch_size=1 --set gradient_accumulation_steps=1 --set lora_dropout=0
      --set activation_offloading=true)
bench t4-llama8b-qlora-24k-cap12 $L/qlora-conservative-24gb.yaml "${LONG[@]}" --set sequence_len=24576
bench t4-llama8b-qlora-32k-cap12 $L/qlora-conservative-24gb.yaml "${LONG[@]}" --set sequence_len=32768

# The bf16 recipe as written (gradient checkpointing, 4 × 4,096 packed, LoRA dropout), one micro-batch per step.
bench recipe-llama8b-lora-bf16-80gb $L/lora-bf16-80gb.yaml --warmup 2 --steps 3 --set gradient_accumulation_steps=1
