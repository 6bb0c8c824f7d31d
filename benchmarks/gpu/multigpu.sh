#!/usr/bin/env bash
# GPU host, kind nvidia-h200-x2, one command: the multi-GPU recipes measured. Run from the repo root with .whl
# carried (../shared/gpu-host/fetch-wheels-slim.sh; no DeepSpeed needed: these runs are DDP and FSDP2):
#   bash benchmarks/gpu/multigpu.sh            (ONLY="mg-lora8b-1gpu mg-lora8b-2gpu" runs just those)
# The FSDP1 32B group alone (builds only the 32B model; ~2 min build + 2 runs of ~2-3 min, not yet run):
#   ONLY="mg-qlora32b-fsdp1-cap24 mg-qlora32b-fsdp1-nocap" bash benchmarks/gpu/multigpu.sh
# At the end everything the call wrote to $OUT is packed into one $OUT/multigpu-results.tgz (the loose files stay
# only if packing fails or the command is killed first).
# Every measurement is `loft bench speed` (benchmarks/speed.py): a random-initialised model of the real
# architecture, synthetic rows, tokens/s over the timed steps counted on every rank, peaks per GPU, and
# training/checks/memory.py's per-GPU estimate for the same config (what `loft doctor --gpus N` prints). Each run is
# independent and its JSON is copied to $OUT as soon as it ends; $OUT/multigpu.json gathers them after each run.
#
#   mg-lora8b-1gpu / -2gpu   lora-bf16-ddp-80gb.yaml on 1 GPU (accum 4) and 2 GPUs (accum 2): the same 8 packed
#                            4,096-token sequences per optimizer step, 20 steps each (scaling, first 20 losses)
#   mg-qlora32b-cap24        qlora-fsdp2-24gb.yaml on 2 GPUs, each rank capped at 24 GiB
#   mg-full8b-cap80          full-fsdp2-80gb.yaml on 2 GPUs, each rank capped at 80 GiB
#   mg-qlora32b-fsdp1-cap24  qlora-fsdp1-24gb.yaml (sharded 4-bit loading) on 2 GPUs, each rank capped at 24 GiB
#   mg-qlora32b-fsdp1-nocap  the same uncapped, only when the capped run did not end ok: where its peaks really are
#   mg-qlora32b-merge        that run's adapter through `loft merge` on the CPU (a second call while the host is warm:
#                            ONLY=mg-qlora32b-merge; the random 32B stays in runs/ between calls)
#
# Time on 2 × H200 (expected, not yet run): wheels ~40 s; the random Llama-3.1-8B (16 GB) ~40 s; the random
# Qwen2.5-32B (65 GB on disk, built on GPU 1 in the background while the 1-GPU run uses GPU 0) ~2 min; the four
# runs ~1.5-2.5 min each. lib.sh starts nothing new after 540 s: a run cut off that way says SKIPPED (time), and
# a second call with ONLY=... finishes it while the host is still warm (the random models stay in runs/).
# Disk: ~85 GB under runs/random-models (the x2 host has 128 GB).
# shellcheck source=benchmarks/gpu/lib.sh
source benchmarks/gpu/lib.sh
# NVLink multicast stays off on this host (NCCL NVLS, torch symmetric memory, NVSHMEM): keep whatever is set.
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}" TORCH_SYMM_MEM_DISABLE_MULTICAST="${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}"
export NVSHMEM_DISABLE_NVLS="${NVSHMEM_DISABLE_NVLS:-1}"
L=recipes/llama-3.1-8b
Q=recipes/qwen2.5-32b
env | grep -E '^(NCCL_NVLS_ENABLE|TORCH_SYMM_MEM_DISABLE_MULTICAST|NVSHMEM_DISABLE_NVLS)=' >"$OUT/env.txt"

# wanted NAME...: any of these measurements is selected by ONLY (all are when ONLY is empty).
wanted() {
  local name
  for name in "$@"; do [[ -z $ONLY || " $ONLY " == *" $name "* ]] && return 0; done
  return 1
}
# bundle: $OUT's files into one tar, after lib.sh's summary and logs are written.
bundle() {
  local files
  files=$(cd "$OUT" && find . -maxdepth 1 -type f ! -name multigpu-results.tgz -printf '%P\n')
  [[ -n $files ]] || return 0
  # shellcheck disable=SC2086  # one name per line, none with spaces (they are this script's own)
  (cd "$OUT" && tar czf multigpu-results.tgz $files && rm -f $files) || echo "packing failed: loose files kept in $OUT"
}
trap 'finish; bundle' EXIT

# keep NAME: this run's JSON into $OUT, then the combined report (scaling, loss match, estimate errors).
keep() {
  cp "runs/bench-speed/$1/speed.json" "$OUT/speed-$1.json" 2>/dev/null || echo "NO RESULT: $1"
  # What rank 0 saved at the end: under FSDP2 the adapter must be whole (full LoRA shapes), as `loft merge` needs.
  [[ -d runs/bench-speed/$1/loft/adapter ]] && python3 - "runs/bench-speed/$1/loft/adapter" >"$OUT/adapter-$1.json" 2>&1 <<'PY'
import json, sys
from pathlib import Path
from safetensors import safe_open
d = Path(sys.argv[1])
out = {"files": sorted(p.name for p in d.iterdir() if p.is_file())}
if (d / "adapter_model.safetensors").exists():
    with safe_open(d / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
        out.update(tensors=len(keys), shapes={k: list(f.get_slice(k).get_shape()) for k in keys[:4]})
print(json.dumps(out, indent=1))
PY
  python3 - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
runs = {}
for path in sorted(glob.glob(f"{out}/speed-mg-*.json")):
    d = json.load(open(path))
    r = d["runners"].get("loft", {})
    runs[d["name"]] = {
        "recipe": d["recipe"], "overrides": d["overrides"], "gpus": d.get("gpus"), "cap_gib": d["cap_gib"],
        "command": d["command"], "status": r.get("status"), "error": r.get("error"),
        "tokens_per_s": r.get("tokens_per_s"), "tokens_per_step": r.get("tokens_per_step"),
        "peak_allocated_gib": r.get("peak_allocated_gib"), "peak_reserved_gib": r.get("peak_reserved_gib"),
        "per_gpu": r.get("per_gpu"), "estimated_allocated_gib": r.get("estimated_allocated_gib"),
        "estimate_error_pct": round(100 * (r["estimated_allocated_gib"] - r["peak_allocated_gib"])
                                    / r["peak_allocated_gib"], 1)
        if r.get("estimated_allocated_gib") and r.get("peak_allocated_gib") else None,
        "losses": (r.get("losses") or [])[:20], "device": r.get("device"), "date": d["date"],
        "versions": d["versions"]}
report = {"runs": runs}
one, two = runs.get("mg-lora8b-1gpu", {}), runs.get("mg-lora8b-2gpu", {})
if one.get("tokens_per_s") and two.get("tokens_per_s"):
    report["scaling_efficiency"] = round(two["tokens_per_s"] / (2 * one["tokens_per_s"]), 3)
    pairs = list(zip(one["losses"], two["losses"]))
    if pairs:
        report["loss_max_abs_diff_first_20"] = round(max(abs(a - b) for a, b in pairs), 4)
json.dump(report, open(f"{out}/multigpu.json", "w"), indent=1)
print({k: v for k, v in report.items() if k != "runs"})
PY
}

# The random models, built once (training/axolotl.py): the 32B one on GPU 1 in the background.
python3 -c "from training.axolotl import word_tokenizer; word_tokenizer()" 2>&1 | tail -2
if wanted mg-lora8b-1gpu mg-lora8b-2gpu mg-full8b-cap80; then
  python3 -c "from benchmarks.speed import resolve_arch; from training.axolotl import random_model; \
random_model(*resolve_arch('meta-llama/Llama-3.1-8B-Instruct'))" 2>&1 | tail -2
fi
build32=""
if wanted mg-qlora32b-cap24 mg-qlora32b-fsdp1-cap24 mg-qlora32b-fsdp1-nocap; then
  CUDA_VISIBLE_DEVICES=1 python3 -c "from benchmarks.speed import resolve_arch; from training.axolotl import \
random_model; random_model(*resolve_arch('Qwen/Qwen2.5-32B-Instruct'))" >"$OUT/build-32b.log" 2>&1 &
  build32=$!
  echo "=== building the random Qwen2.5-32B on GPU 1 in the background ($SECONDS s)"
fi
# The estimates as `loft doctor --gpus 2` prints them, while GPU 0 works (CPU only).
for r in $L/lora-bf16-ddp-80gb.yaml $L/full-fsdp2-80gb.yaml $Q/qlora-fsdp2-24gb.yaml $Q/qlora-fsdp1-24gb.yaml; do
  python3 -m training.cli doctor "$r" --gpus 2 --no-data --json >"$OUT/doctor-$(basename "$r" .yaml).json" 2>/dev/null
done &

CUDA_VISIBLE_DEVICES=0 bench mg-lora8b-1gpu $L/lora-bf16-ddp-80gb.yaml --gpus 1 --only loft --warmup 2 --steps 18 \
  --set gradient_accumulation_steps=4
keep mg-lora8b-1gpu
if [[ -n $build32 ]]; then
  wait "$build32" || echo "32B build failed: see $OUT/build-32b.log"
  echo "=== 32B ready ($SECONDS s)"
fi
bench mg-lora8b-2gpu $L/lora-bf16-ddp-80gb.yaml --gpus 2 --only loft --warmup 2 --steps 18
keep mg-lora8b-2gpu
bench mg-qlora32b-cap24 $Q/qlora-fsdp2-24gb.yaml --gpus 2 --cap-gib 24 --only loft --warmup 1 --steps 2 \
  --set gradient_accumulation_steps=2
keep mg-qlora32b-cap24
bench mg-full8b-cap80 $L/full-fsdp2-80gb.yaml --gpus 2 --cap-gib 80 --only loft --warmup 1 --steps 2 \
  --set gradient_accumulation_steps=2
keep mg-full8b-cap80
bench mg-qlora32b-fsdp1-cap24 $Q/qlora-fsdp1-24gb.yaml --gpus 2 --cap-gib 24 --only loft --warmup 1 --steps 2 \
  --set gradient_accumulation_steps=2
keep mg-qlora32b-fsdp1-cap24
if [[ $(field mg-qlora32b-fsdp1-cap24 loft status) != ok ]]; then
  bench mg-qlora32b-fsdp1-nocap $Q/qlora-fsdp1-24gb.yaml --gpus 2 --only loft --warmup 1 --steps 2 \
    --set gradient_accumulation_steps=2
  keep mg-qlora32b-fsdp1-nocap
fi

# The FSDP1 run's adapter (the capped run's, else the uncapped one's) through `loft merge` on the host's CPU, with
# its fidelity check and QLoRA gap, on 16 of the 32 cores so a GPU script can run beside it. The merged 32B
# (65 GB) does not fit beside the random base (65 GB) on the 128 GB disk: it goes to a RAM-backed tmpfs, and is
# deleted once its report is copied. One short held-out chat keeps the CPU forward passes of a 32B model short;
# the loads (seven of a 65 GB model: fp32 reference, merged, rounding floor, NF4 view, the QLoRA candidates) are
# what the merge of a 32B costs anyway.
if wanted mg-qlora32b-merge && ! skip mg-qlora32b-merge; then
  adapter=""
  for run in mg-qlora32b-fsdp1-cap24 mg-qlora32b-fsdp1-nocap; do
    [[ -f runs/bench-speed/$run/loft/adapter/adapter_model.safetensors ]] && { adapter=runs/bench-speed/$run/loft/adapter; break; }
  done
  ram=/dev/shm
  avail() { df -BG --output=avail "$1" 2>/dev/null | tail -1 | tr -dc 0-9; }
  if (( $(avail $ram) < 70 )); then
    mount -o remount,size=120G /dev/shm 2>/dev/null \
      || { mkdir -p /mnt/loft-ram && mount -t tmpfs -o size=120G tmpfs /mnt/loft-ram && ram=/mnt/loft-ram; }
  fi
  df -h "$ram" | tee "$OUT/merge-32b-tmpfs.txt"
  if [[ -z $adapter ]]; then
    echo "NO ADAPTER: no 32B FSDP1 run saved one" | tee "$OUT/merge-32b.log"
  else
    echo "=== mg-qlora32b-merge ($SECONDS s): $adapter -> $ram/merged-qwen32b"
    printf '%s\n' '{"messages": [{"role": "user", "content": "Speak a line of verse about the sea."}, {"role": "assistant", "content": "The sea doth sigh, and in her sighing sings."}]}' >runs/merge-eval-1row.jsonl
    rm -rf "$ram/merged-qwen32b" "$ram/merged-qwen32b.REJECTED"
    OMP_NUM_THREADS=16 taskset -c 0-15 python3 - "$adapter" "$ram/merged-qwen32b" >"$OUT/merge-32b.log" 2>&1 <<'PY'
import json, resource, subprocess, sys, time
started = time.time()
cmd = [sys.executable, "-m", "training.cli", "merge", "--adapter", sys.argv[1], "--out", sys.argv[2],
       "--eval", "runs/merge-eval-1row.jsonl", "--force"]
print(" ".join(cmd), flush=True)
try:
    rc = subprocess.call(cmd, timeout=int(__import__("os").environ.get("MERGE_TIMEOUT", "520")))
except subprocess.TimeoutExpired:
    rc = "timeout"
print(json.dumps({"rc": rc, "wall_s": round(time.time() - started, 1), "command": "loft " + " ".join(cmd[3:]),
                  "max_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)}))
PY
    tail -3 "$OUT/merge-32b.log"
    for d in "$ram/merged-qwen32b" "$ram/merged-qwen32b.REJECTED"; do
      [[ -f $d/merge-report.json ]] && cp "$d/merge-report.json" "$OUT/merge-32b-report.json"
      [[ -f $d/loft-manifest.json ]] && cp "$d/loft-manifest.json" "$OUT/merge-32b-manifest.json"
    done
    du -sh "$ram"/merged-qwen32b* 2>/dev/null | tee -a "$OUT/merge-32b.log"
    rm -rf "$ram"/merged-qwen32b* "$ram"/.merged-qwen32b*
  fi
fi
wait
echo "=== done ($SECONDS s)"
