#!/usr/bin/env bash
# Shared by the GPU-host scripts: install the carried wheelhouse, keep every log, stop starting runs near the
# command's time limit, print one line per runner at the end. Source it from the repo root on the host.
set -uo pipefail
OUT="${OUT:-runs/gpu-out}"
# No new measurement starts after this time (epoch seconds; the host kills a command at 600 s). Export it to share
# one deadline between several scripts in one command. ONLY="name ..." runs just those measurements.
export LOFT_GPU_DEADLINE_AT="${LOFT_GPU_DEADLINE_AT:-$(( $(date +%s) + 540 ))}"
ONLY="${ONLY:-}"
mkdir -p "$OUT"
# Several scripts may run at once (one per GPU): the caller then installs once, exports LOFT_WHEELS_READY=1, and
# no script reinstalls under another's feet.
if [[ -z ${LOFT_WHEELS_READY:-} ]]; then
  # shellcheck source=/dev/null
  source .whl/activate.sh || exit 1
fi
export PYTHONPATH="$PWD:$PYTHONPATH"

finish() {
  tar czf "$OUT/logs.tgz" --exclude="*.safetensors" --exclude=prepared --exclude=adapter --exclude="*.trainer" \
      --exclude=out runs/bench-speed runs/doctor-measure runs/calibration runs/doctor 2>/dev/null
  python3 - <<'PY' | tee "$OUT/summary.txt"
import glob, json
for path in sorted(glob.glob("runs/bench-speed/*/speed.json")):
    d = json.load(open(path))
    for name, r in d["runners"].items():
        if r.get("status") != "ok":
            print(f"{d['name']:<34} {name:<8} {r.get('status')}: {str(r.get('error') or r.get('reason'))[:90]}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        print(f"{d['name']:<34} {name:<8} {r['tokens_per_s']:>9,.0f} tok/s {r['tokens_per_step']:>7,} tok/step "
              f"alloc {r['peak_allocated_gib']:>6} res {r['peak_reserved_gib']:>6} est {r.get('estimated_allocated_gib')} "
              f"MFU {mfu}")
    for peer, ratio in (d.get("versus") or {"baseline": d.get("ratios")}).items():
        if ratio:
            best = " (strongest)" if peer == d.get("strongest") else ""
            print(f"{d['name']:<34} loft/{peer}{best} {ratio}")
for path in sorted(glob.glob("runs/calibration/*.json")):
    d = json.load(open(path))
    m = d["measured"]
    print(f"{path.split('/')[-1][:-5]:<34} measure  alloc {m['peak_allocated_gib']:>6.2f} res {m['peak_reserved_gib']:>6.2f} "
          f"est {d['estimate_allocated_gib']:>6.2f} error {d['error_pct']:+.1f}%")
PY
}
trap finish EXIT

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.csv"

# skip NAME: true (and says why) when NAME is not in ONLY or the deadline has passed.
skip() {
  if [[ -n $ONLY && " $ONLY " != *" $1 "* ]]; then return 0; fi
  if (( $(date +%s) > LOFT_GPU_DEADLINE_AT )); then echo "SKIPPED (time): $1"; return 0; fi
  return 1
}

# bench NAME RECIPE [loft bench speed options...]: one measurement, skipped if too little time is left; its
# results file is copied to $OUT/NAME.json at once (a command killed later still returns it). RUN_TIMEOUT=SECONDS
# ends one measurement, runners included (timeout signals the whole process group), so one hang cannot eat the call.
bench() {
  local name="$1" recipe="$2"; shift 2
  skip "$name" && return 0
  echo "=== $name ($SECONDS s): $recipe $*"
  rm -f "runs/bench-speed/$name/speed.json"
  ${RUN_TIMEOUT:+timeout -k 10 "$RUN_TIMEOUT"} python3 -m benchmarks.speed "$recipe" --name "$name" "$@" 2>&1 \
    | grep -E "^  |error|Error" || true
  cp "runs/bench-speed/$name/speed.json" "$OUT/$name.json" 2>/dev/null || echo "NO RESULT: $name"
}

# measure NAME RECIPE [--set KEY=VALUE...]: `loft doctor --measure`, its measure.json kept as runs/calibration/NAME.json.
measure() {
  local name="$1" recipe="$2"; shift 2
  skip "$name" && return 0
  echo "=== measure $name ($SECONDS s): $recipe $*"
  local stamp; stamp=$(mktemp)
  python3 -m training.cli doctor "$recipe" --no-data --measure --measure-steps 3 "$@" 2>&1 \
    | grep -E "^(measured|estimate|loft doctor:|  *error)|Error" || true
  local made; made=$(find runs/doctor-measure -name measure.json -newer "$stamp" 2>/dev/null | head -1)
  mkdir -p runs/calibration
  if [[ -n $made ]]; then cp "$made" "runs/calibration/$name.json"; else echo "NO MEASUREMENT: $name"; fi
  rm -f "$stamp"
}

# field NAME RUNNER KEY: a value from runs/bench-speed/NAME/speed.json ("" if absent).
field() {
  python3 -c "import json,sys; r=json.load(open('runs/bench-speed/$1/speed.json'))['runners'].get('$2', {}); print(r.get('$3', ''))" 2>/dev/null
}
