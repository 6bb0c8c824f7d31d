#!/usr/bin/env bash
# Create .venv from the fully pinned lock that fits this host (CPU, or an NVIDIA GPU through CUDA 12.8 / 13.0),
# then build llama.cpp and convert the embedded default model. Idempotent: each step checks what is already there.
#
# Usage: bash setup/install.sh [--profile auto|cpu|cu128|cu130] [--dry-run] [--wheelhouse DIR] [--build-flash-attn]
#   --profile auto (default) reads nvidia-smi: driver CUDA >= 13.0 -> cu130, 12.x -> cu128, no GPU -> cpu.
#   --dry-run           print the plan (host, pins, steps, warnings with their fixes) and change nothing
#   --wheelhouse DIR    install offline from DIR, made by setup/wheelhouse.sh (pip --no-index --find-links DIR)
#   --build-flash-attn  compile flash-attn 2.8.3 when no wheel matches (1-3 hours; MAX_JOBS from free memory)
# Env: LOFT_VENV (default .venv), PYTHON (default python3.11, else python3), LOFT_CACHE (llama.cpp and models),
#      NINJA_VERSION (for --build-flash-attn). Test seams LOFT_FAKE_NVIDIA_SMI / LOFT_FAKE_PROC: see setup/plan.py.
# After a GPU install it runs setup/verify. Example: bash setup/install.sh --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."

NINJA_VERSION="${NINJA_VERSION:-1.13.0}"
FLASH_ATTN_REQ=setup/requirements/flash-attn.txt  # the pin and its sdist's sha256
FLASH_ATTN_RELEASES="https://github.com/Dao-AILab/flash-attention/releases/download"

PROFILE=auto
DRY_RUN=0
WHEELHOUSE=""
BUILD_FA=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --profile) PROFILE="${2:?--profile needs a value: auto, cpu, cu128 or cu130}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --wheelhouse) WHEELHOUSE="${2:?--wheelhouse needs a directory}"; shift 2 ;;
    --build-flash-attn) BUILD_FA=1; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
done
case "$PROFILE" in
  auto|cpu|cu128|cu130) ;;
  *) echo "install.sh: unknown profile $PROFILE; profiles: auto cpu cu128 cu130" >&2; exit 2 ;;
esac

VENV="${LOFT_VENV:-.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3

plan_args=(--profile "$PROFILE" --venv "$VENV" --python "$PY")
[[ $BUILD_FA == 1 ]] && plan_args+=(--build-flash-attn)
[[ -n $WHEELHOUSE ]] && plan_args+=(--wheelhouse "$WHEELHOUSE")

if [[ $DRY_RUN == 1 ]]; then
  rc=0
  "$PY" setup/plan.py plan "${plan_args[@]}" || rc=$?
  [[ $rc -le 1 ]] || { echo "install.sh: setup/plan.py failed (exit $rc) under $PY" >&2; exit "$rc"; }
  eval "$("$PY" setup/plan.py plan --shell "${plan_args[@]}" 2>/dev/null || true)"
  LOCK="${LOFT_LOCK:-setup/requirements/$PROFILE.txt}"
  stamp="$VENV/.loft-installed-$(cat "$LOCK" pyproject.toml | sha256sum | cut -c1-16)"
  echo "plan: profile=${LOFT_PROFILE:-$PROFILE} venv=$VENV lock=$LOCK ($(grep -c '==' "$LOCK") pins) python=$("$PY" --version 2>&1)"
  if [[ -f "$stamp" ]]; then echo "plan: environment already matches the lock"; else echo "plan: install the lock into $VENV"; fi
  echo "plan: llama.cpp -> $(bash setup/build_llama_cpp.sh --print-dir)"
  exit "$rc"
fi

if [[ $PROFILE == cpu && -z $WHEELHOUSE && $BUILD_FA == 0 ]]; then
  # What `make setup` runs: no GPU to plan for, so no planner; only the Python check it would make.
  "$PY" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))' \
    || { echo "install.sh: Python >= 3.11 is required ($PY is $("$PY" --version 2>&1)); try PYTHON=python3.12" >&2; exit 1; }
  LOFT_PROFILE=cpu LOFT_LOCK=setup/requirements/cpu.txt LOFT_TORCH_INDEX="" LOFT_TORCH_PIN="" LOFT_TORCH_CUDA=""
  LOFT_FA_BUILD=0 LOFT_FA_WHEEL="" LOFT_MAX_JOBS=1 LOFT_FA_ARCHS=""
else
  # The plan goes to stderr; KEY=value lines (LOFT_PROFILE, LOFT_LOCK, ...) come back on stdout.
  vars="$("$PY" setup/plan.py plan --shell "${plan_args[@]}")" \
    || { echo "install.sh: refused; fix the errors above, or look first with --dry-run" >&2; exit 1; }
  eval "$vars"
fi
LOCK="$LOFT_LOCK"
[[ -f "$LOCK" ]] || { echo "install.sh: no lock file $LOCK (setup/requirements/ has the profiles' locks)" >&2; exit 2; }

if [[ -n $WHEELHOUSE ]]; then
  stamp_file="$WHEELHOUSE/loft-wheelhouse.txt"
  [[ -f $stamp_file ]] || { echo "install.sh: $WHEELHOUSE has no loft-wheelhouse.txt; build it with: bash setup/wheelhouse.sh $LOFT_PROFILE $WHEELHOUSE" >&2; exit 1; }
  want_py="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  if ! grep -qx "profile=$LOFT_PROFILE" "$stamp_file" || ! grep -qx "python=$want_py" "$stamp_file"; then
    echo "install.sh: $WHEELHOUSE was built for $(paste -sd' ' "$stamp_file"), not profile=$LOFT_PROFILE python=$want_py" >&2
    exit 1
  fi
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
vpy="$VENV/bin/python"
# DeepSpeed is on PyPI as an sdist only. With DS_BUILD_OPS=0 it builds as pure Python on any host, GPU or not; its
# C++/CUDA ops compile on first use instead (`setup/verify` says whether they can), and ZeRO with torch's own
# optimizers needs none of them.
export DS_BUILD_OPS=0
src=()
[[ -n $WHEELHOUSE ]] && src=(--no-index --find-links "$WHEELHOUSE")

stamp="$VENV/.loft-installed-$(cat "$LOCK" pyproject.toml | sha256sum | cut -c1-16)"
if [[ ! -f "$stamp" ]]; then
  old="$(cat "$VENV"/.loft-installed-* 2>/dev/null | head -1 || true)"
  if [[ -n $old && $old != "$LOFT_PROFILE" ]]; then
    echo "setup: warning: $VENV holds profile $old; packages only $old had will stay (clean switch: rm -rf $VENV)" >&2
  fi
  echo "setup: installing $LOCK into $VENV (about 5 minutes the first time; GPU profiles download ~4 GB)"
  [[ -x "$vpy" ]] || "$PY" -m venv "$VENV" \
    || { echo "install.sh: '$PY -m venv' failed; Debian/Ubuntu: sudo apt install python3-venv (or python3.12-venv)" >&2; exit 1; }
  if [[ -n $LOFT_TORCH_INDEX ]]; then
    # cu128: torch's +cu128 wheel exists only on the PyTorch index. It is installed with its dependencies, which
    # torch pins exactly (its CUDA 12 runtime wheels); everything the lock names is held to the lock's version.
    "$PY" setup/plan.py pins "$LOCK" --exclude torch >"$work/constraints.txt"
    idx=(--index-url "$LOFT_TORCH_INDEX" --extra-index-url https://pypi.org/simple)
    [[ -n $WHEELHOUSE ]] && idx=()
    "$vpy" -m pip install -q "${src[@]}" "${idx[@]}" -c "$work/constraints.txt" "torch==$LOFT_TORCH_PIN"
    if [[ -n $WHEELHOUSE ]]; then
      "$PY" setup/plan.py pins "$LOCK" --exclude torch >"$work/rest.txt"
    else
      "$PY" setup/plan.py pins "$LOCK" --exclude torch --hashes >"$work/rest.txt"
    fi
    "$vpy" -m pip install -q --no-deps "${src[@]}" -r "$work/rest.txt"
  elif [[ -n $WHEELHOUSE ]]; then
    # Hashes dropped: sdist-only packages are wheels built by wheelhouse.sh (their sdists were hash-checked there).
    "$PY" setup/plan.py pins "$LOCK" >"$work/pins.txt"
    "$vpy" -m pip install -q --no-deps "${src[@]}" -r "$work/pins.txt"
  else
    # --no-deps: the lock is the complete set, so pip installs exactly it and resolves nothing (a lock with
    # hashes, cu130, is checked file by file).
    "$vpy" -m pip install -q --no-deps -r "$LOCK"
  fi
  "$vpy" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null \
    || "$vpy" -m pip install -q --no-deps "${src[@]}" -e .
  rm -f "$VENV"/.loft-installed-*
  echo "$LOFT_PROFILE" >"$stamp"
fi

# Pins asserted after install, every one of them: a silently different torch or axolotl is the commonest breakage.
"$vpy" - "$LOCK" "$LOFT_TORCH_CUDA" <<'PY'
import os, sys
sys.path.insert(0, "setup")
import plan

lock, want_cuda = sys.argv[1], sys.argv[2]
have = {}  # name -> version from the *.dist-info folder names: reading 260 METADATA files costs seconds
for d in filter(os.path.isdir, sys.path[1:]):
    for entry in os.listdir(d):
        if entry.endswith(".dist-info") and "-" in entry:
            name, version = entry[: -len(".dist-info")].rsplit("-", 1)
            have.setdefault(plan.norm(name), version)
bad = []
for p in plan.read_lock(lock).pins:
    got = have.get(plan.norm(p.name))
    if got is None or (got != p.version if "+" in p.version else got.split("+")[0] != p.version):
        bad.append(f"{p.name}: want {p.version}, have {got or 'nothing'}")
if want_cuda:
    import torch
    if torch.version.cuda != want_cuda:
        bad.append(f"torch CUDA: want {want_cuda}, have {torch.version.cuda}")
if bad:
    sys.exit("install.sh: pins do not hold: " + "; ".join(bad[:8]) + (" ..." if len(bad) > 8 else "")
             + " (delete .venv and rerun)")
PY

fa_version="$(sed -n 's/^flash-attn==\([0-9.]*\) .*/\1/p' "$FLASH_ATTN_REQ")"
if [[ -n $LOFT_FA_WHEEL ]]; then
  "$vpy" -c 'import flash_attn' 2>/dev/null \
    || "$vpy" -m pip install -q --no-deps "${src[@]}" "$FLASH_ATTN_RELEASES/v$fa_version/$LOFT_FA_WHEEL"
elif [[ $LOFT_FA_BUILD == 1 ]]; then
  if ! "$vpy" -c "import sys, importlib.metadata as m, flash_attn; sys.exit(m.version('flash-attn') != '$fa_version')" 2>/dev/null; then
    echo "setup: compiling flash-attn $fa_version for sm_$LOFT_FA_ARCHS with MAX_JOBS=$LOFT_MAX_JOBS (1-3 hours)"
    "$vpy" -m pip install -q "${src[@]}" "ninja==$NINJA_VERSION"
    # One arch and NVCC_THREADS=1 keep each job near 4 GiB (flash-attn's own default, 4 threads x 4 archs, ~9 GiB).
    MAX_JOBS="$LOFT_MAX_JOBS" NVCC_THREADS=1 FLASH_ATTN_CUDA_ARCHS="$LOFT_FA_ARCHS" FLASH_ATTENTION_FORCE_BUILD=TRUE \
      PATH="$VENV/bin:$PATH" "$vpy" -m pip install --no-deps --no-build-isolation "${src[@]}" -r "$FLASH_ATTN_REQ"
  fi
fi

PYTHON="$vpy" bash setup/build_llama_cpp.sh
"$VENV/bin/loft" model >/dev/null
if [[ $LOFT_PROFILE != cpu ]]; then
  setup/verify --python "$vpy" --profile "$LOFT_PROFILE" || { echo "install.sh: installed, but setup/verify found problems (above)" >&2; exit 1; }
fi
echo "setup: ready ($VENV, profile $LOFT_PROFILE)"
