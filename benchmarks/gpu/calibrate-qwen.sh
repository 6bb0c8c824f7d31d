#!/usr/bin/env bash
# Peak memory of the Qwen2.5-7B recipes and variants by `loft doctor --measure`, beside the memory estimator's
# figure for the same config: the points the estimator is calibrated against (benchmarks/MEMORY.md); first the
# host's `setup/verify --json` (what setup/host-reports/ holds). One 80 GB GPU (measured on an H100 80GB; device
# kind nvidia-h200). Run from the repo root with the host wheelhouse as .whl:
#   bash benchmarks/gpu/calibrate-qwen.sh  (results in $OUT, each measure.json in runs/calibration/;
#                                                   committed: benchmarks/results/measure-2026-11-22.json)
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
