#!/usr/bin/env bash
# GPU host: `loft doctor --measure` on the Qwen2.5-7B recipes and variants (estimator calibration, issue #4),
# plus `setup/verify --json` from the host (issue #9). Run from the repo root with .whl carried:
#   bash benchmarks/gpu/calibrate-qwen.sh      (results in $OUT; measure.json of each in runs/calibration/)
# shellcheck source=benchmarks/gpu/lib.sh
source benchmarks/gpu/lib.sh
if [[ -z $ONLY ]]; then timeout 120 python3 setup/verify --json > "$OUT/verify.json"; echo "setup/verify exit $?"; fi
Q=recipes/qwen2.5-7b
NO_LIGER=(--set liger_fused_linear_cross_entropy=false --set liger_rms_norm=false --set liger_glu_activation=false
          --set liger_rope=false)
measure qwen7b-qlora-1024-liger $Q/qlora-sft-8gb.yaml
measure qwen7b-qlora-4096-noliger $Q/qlora-sft-8gb.yaml --set sequence_len=4096 "${NO_LIGER[@]}"
measure qwen7b-qlora-2048-liger-nogc $Q/qlora-sft-8gb.yaml --set sequence_len=2048 --set gradient_checkpointing=false
measure qwen7b-dpo-1024 $Q/dpo-qlora-12gb.yaml
measure qwen7b-dpo-2048 $Q/dpo-qlora-12gb.yaml --set sequence_len=2048
measure qwen7b-qlora-8192-liger-mb1 $Q/qlora-sft-80gb.yaml --set sequence_len=8192 --set micro_batch_size=1
