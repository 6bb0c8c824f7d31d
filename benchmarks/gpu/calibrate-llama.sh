#!/usr/bin/env bash
# GPU host: `loft doctor --measure` on Llama-3.1-8B recipes and variants (estimator calibration, issue #4).
# Run from the repo root with .whl carried:  bash benchmarks/gpu/calibrate-llama.sh   (results in $OUT)
# shellcheck source=benchmarks/gpu/lib.sh
source benchmarks/gpu/lib.sh
L=recipes/llama-3.1-8b
LIGER=(--set "plugins=[axolotl.integrations.liger.LigerPlugin]" --set liger_rms_norm=true --set liger_rope=true
       --set liger_glu_activation=true --set liger_fused_linear_cross_entropy=true)
measure llama8b-lora-bf16-8192 $L/lora-bf16-80gb.yaml --set sequence_len=8192 --set micro_batch_size=1
measure llama8b-lora-bf16-2048-nogc $L/lora-bf16-80gb.yaml --set sequence_len=2048 --set micro_batch_size=1 \
  --set gradient_checkpointing=false
measure llama8b-qlora-8192-liger $L/qlora-conservative-24gb.yaml --set sequence_len=8192 --set micro_batch_size=1 \
  "${LIGER[@]}"
measure llama8b-lora-8bit-rslora $L/lora-8bit-rslora-24gb.yaml

