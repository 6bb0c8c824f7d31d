#!/usr/bin/env bash
# Shared by the GPU-host scripts: install the carried wheelhouse, keep every log, stop starting runs near the
# command's time limit, print one line per runner at the end. Source it from the repo root on the host.
set -uo pipefail
OUT="${OUT:-runs/gpu-out}"
DEADLINE="${DEADLINE:-540}"  # seconds after which no new measurement starts (the host kills a command at 600)
mkdir -p "$OUT"
# shellcheck source=/dev/null
source .whl/activate.sh || exit 1
export PYTHONPATH="$PWD:$PYTHONPATH"

finish() {
  tar czf "$OUT/logs.tgz" --exclude="*.safetensors" --exclude=prepared --exclude=adapter --exclude="*.trainer" \
      runs/bench-speed 2>/dev/null
  python3 - <<'PY' | tee "$OUT/summary.txt"
import glob, json
for path in sorted(glob.glob("runs/bench-speed/*/speed.json")):
    d = json.load(open(path))
    for name, r in d["runners"].items():
        if r.get("status") != "ok":
            print(f"{d['name']:<34} {name:<8} {r.get('status')}: {str(r.get('error'))[:90]}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        print(f"{d['name']:<34} {name:<8} {r['tokens_per_s']:>9,.0f} tok/s {r['tokens_per_step']:>7,} tok/step "
              f"alloc {r['peak_allocated_gib']:>6} res {r['peak_reserved_gib']:>6} est {r.get('estimated_allocated_gib')} "
              f"MFU {mfu}")
    if d.get("ratios"):
        print(f"{d['name']:<34} ratio    {d['ratios']}")
PY
}
trap finish EXIT

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.csv"

# bench NAME RECIPE [loft bench speed options...]: one measurement, skipped if too little time is left.
bench() {
  local name="$1" recipe="$2"; shift 2
  if (( SECONDS > DEADLINE )); then echo "SKIPPED (time): $name"; return 0; fi
  echo "=== $name ($SECONDS s): $recipe $*"
  python3 -m benchmarks.speed "$recipe" --name "$name" "$@" 2>&1 | grep -E "^  |error|Error" || true
}

# field NAME RUNNER KEY: a value from runs/bench-speed/NAME/speed.json ("" if absent).
field() {
  python3 -c "import json,sys; r=json.load(open('runs/bench-speed/$1/speed.json'))['runners'].get('$2', {}); print(r.get('$3', ''))" 2>/dev/null
}
