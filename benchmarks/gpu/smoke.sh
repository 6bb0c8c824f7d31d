#!/usr/bin/env bash
# Smoke test on the GPU host (nothing timed is kept): the carried wheelhouse installs, `loft bench speed` runs
# both runners end to end on a tiny random model (QLoRA SFT with the profiler, DPO), and a memory cap too small
# for anything reports "does not fit" instead of crashing.
# Run from the repo root on the host, with .whl carried:  bash benchmarks/gpu/smoke.sh   (results in $OUT)
set -uo pipefail
OUT="${OUT:-runs/gpu-out}"
mkdir -p "$OUT"
# shellcheck source=/dev/null
source .whl/activate.sh || exit 1
export PYTHONPATH="$PWD:$PYTHONPATH"
trap 'tar czf "$OUT/logs.tgz" runs/bench-speed --exclude="*.safetensors" --exclude=prepared --exclude=adapter \
      --exclude="*.trainer" 2>/dev/null' EXIT

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
python3 -c "import torch, transformers, axolotl, trl, peft, bitsandbytes, liger_kernel as lk, importlib.metadata as m
print({p: m.version(p) for p in ('torch', 'transformers', 'axolotl', 'trl', 'peft', 'bitsandbytes', 'liger-kernel')})
print(torch.cuda.get_device_name(0), torch.cuda.is_available())" || exit 1

R=recipes/qwen2.5-7b/qlora-sft-8gb.yaml
speed() { python3 -m benchmarks.speed "$R" --arch tiny "$@" || echo "SMOKE FAILED: $*"; }
speed --steps 3 --warmup 1 --vs baseline --profile --name smoke-sft --json "$OUT/smoke-sft.json"
speed --steps 2 --warmup 1 --vs baseline --set rl=dpo --set rl_beta=0.1 --name smoke-dpo --json "$OUT/smoke-dpo.json"
speed --steps 2 --warmup 1 --vs baseline --cap-gib 0.02 --name smoke-cap --json "$OUT/smoke-cap.json"
