#!/usr/bin/env bash
# Peak memory of Llama-3.1-8B recipes and variants by `loft doctor --measure`, beside the memory estimator's
# figure for the same config: the points the estimator is calibrated against (benchmarks/MEMORY.md). One 80 GB GPU
# (measured on an H100 80GB; device kind nvidia-h200). Run from the repo root with the host wheelhouse as .whl:
#   bash benchmarks/gpu/calibrate-llama.sh  (results in $OUT; committed: benchmarks/results/measure-2026-11-22.json)
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

