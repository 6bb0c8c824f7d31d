#!/usr/bin/env bash
# GPU host, Qwen2.5-7B architecture: target 1 (QLoRA under a 12 GiB cap vs the TRL baseline), target 3 (DPO
# QLoRA at sequence 2048 vs TRL DPOTrainer), then the Qwen recipes as written under their card's cap.
# Run from the repo root with .whl carried:  bash benchmarks/gpu/qwen.sh   (results in $OUT)
# shellcheck source=benchmarks/gpu/lib.sh
source benchmarks/gpu/lib.sh
Q=recipes/qwen2.5-7b
LIGER=(--set "plugins=[axolotl.integrations.liger.LigerPlugin]" --set liger_rms_norm=true --set liger_rope=true
       --set liger_glu_activation=true)

# Target 1: the consumer recipe, packed into 8,192-token sequences, one micro-batch per optimizer step; the
# baseline accumulates as many unpacked rows (same tokens per step). Rows shaped like the recipe's data.
bench t1-qwen7b-qlora-cap12 $Q/qlora-sft-8gb.yaml --cap-gib 12 --vs baseline --warmup 2 --steps 3 \
  --set sample_packing=true --set sequence_len=8192 --set gradient_accumulation_steps=1

# Target 3: DPO at 2,048 tokens, full-length pairs; Loft adds Liger's fused DPO loss, Liger layers and the
# fused LoRA kernels. Two pairs per step for both runners.
DPO=(--data full --warmup 2 --steps 3 --set sequence_len=2048 --set gradient_accumulation_steps=2)
bench t3-qwen7b-dpo-2048 $Q/dpo-qlora-12gb.yaml "${DPO[@]}" --vs baseline --profile "${LIGER[@]}" \
  --set dpo_use_liger_kernel=true --set lora_mlp_kernel=true --set lora_qkv_kernel=true --set lora_o_kernel=true
if [[ "$(field t3-qwen7b-dpo-2048 loft status)" != ok ]]; then
  bench t3b-qwen7b-dpo-2048-liger-layers $Q/dpo-qlora-12gb.yaml "${DPO[@]}" --only loft "${LIGER[@]}"
fi
reserved="$(field t3-qwen7b-dpo-2048 loft peak_reserved_gib)"
if [[ -n "$reserved" ]] && python3 -c "import sys; sys.exit(not $reserved > 11)"; then  # show it fits under a cap
  bench t3c-qwen7b-dpo-2048-cap11 $Q/dpo-qlora-12gb.yaml "${DPO[@]}" --only loft --cap-gib 11 "${LIGER[@]}" \
    --set dpo_use_liger_kernel=true --set lora_mlp_kernel=true --set lora_qkv_kernel=true --set lora_o_kernel=true
fi

# The recipes as written, full-length rows (peak memory at sequence_len), two micro-batches per step.
R=(--data full --warmup 2 --steps 3 --set gradient_accumulation_steps=2)
bench recipe-qwen7b-qlora-sft-8gb $Q/qlora-sft-8gb.yaml "${R[@]}" --cap-gib 8
bench recipe-qwen7b-dpo-qlora-12gb $Q/dpo-qlora-12gb.yaml "${R[@]}" --cap-gib 12
bench recipe-qwen7b-qlora-sft-80gb $Q/qlora-sft-80gb.yaml "${R[@]}"
bench recipe-qwen7b-dpo-precompute-12gb $Q/dpo-qlora-precompute-12gb.yaml "${R[@]}" --cap-gib 12
