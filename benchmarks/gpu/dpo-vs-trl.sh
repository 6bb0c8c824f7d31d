#!/usr/bin/env bash
# Qwen2.5-7B DPO QLoRA at 2,048 tokens inside 11 GiB: Loft against TRL's DPOTrainer (the hand-written baseline,
# benchmarks/baseline_trl.py, with the adapter-disabled reference model) on full-length pairs, two pairs per step.
# Run names start `t3-`: the third of the four speed goals in benchmarks/RESULTS.md. One 80 GB GPU (measured on an
# H100 80GB; device kind nvidia-h200). Run from the repo root with the host wheelhouse carried as .whl:
#   bash benchmarks/gpu/dpo-vs-trl.sh  (results in $OUT; committed: benchmarks/results/speed-2026-11-22.json)
# The runs follow each other as the work did: each one's result explains the next. ONLY="NAME ..." runs just those.
# shellcheck source=benchmarks/gpu/lib.sh
source benchmarks/gpu/lib.sh
Q=recipes/qwen2.5-7b
LIGER=(--set "plugins=[axolotl.integrations.liger.LigerPlugin]" --set liger_rms_norm=true --set liger_rope=true
       --set liger_glu_activation=true)
DPO=(--data full --warmup 2 --steps 3 --vs baseline --set sequence_len=2048 --set gradient_accumulation_steps=2)

# Uncapped, with Liger's fused DPO loss (no logits kept for policy or reference), Liger layers and the fused LoRA
# kernels. It crashes: Axolotl 0.19 patches the LoRA kernels in before TRL wraps the DPO model ("Model must be a
# PeftModelForCausalLM"). Kept as the record of why the runs below leave the kernels off.
bench t3-qwen7b-dpo-2048-kernels $Q/dpo-qlora-12gb.yaml "${DPO[@]}" "${LIGER[@]}" \
  --set lora_mlp_kernel=true --set lora_qkv_kernel=true --set lora_o_kernel=true --set dpo_use_liger_kernel=true \
  --profile
# Without the LoRA kernels, under the 11 GiB cap: both runners run out of memory in the loss (TRL: a pair's fp32
# logits; Liger's fused DPO loss: still one pair per chunk).
bench t3-qwen7b-dpo-2048 $Q/dpo-qlora-12gb.yaml "${DPO[@]}" --cap-gib 11 "${LIGER[@]}" --set dpo_use_liger_kernel=true
# LoftDPOTrainer (training/plugins/dpo.py) runs the LM head on completion tokens only, a few hundred at a time,
# and skips Axolotl's per-micro-batch gc/empty_cache. The baseline runs uncapped (it needs ~17 GiB at 2,048):
# its speed is the bar.
bench t3-qwen7b-dpo-2048-loft $Q/dpo-qlora-12gb.yaml "${DPO[@]}" --cap-gib 11 --baseline-cap-gib 0 "${LIGER[@]}" \
  --set trainer_cls=training.plugins.dpo.LoftDPOTrainer
# The 12 GB recipe at its own sequence length (1,024 then) with Loft's trainer, against TRL under the same 12 GiB.
bench t3-qwen7b-dpo-1024-loft-trainer $Q/dpo-qlora-12gb.yaml --data full --warmup 2 --steps 3 --vs baseline \
  --cap-gib 12 --set gradient_accumulation_steps=2 --set trainer_cls=training.plugins.dpo.LoftDPOTrainer
