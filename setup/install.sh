#!/usr/bin/env bash
# Create .venv from a fully pinned lock file, then build llama.cpp and convert the embedded default model.
# Idempotent: each step checks what is already there and skips it.
#
# Usage: bash setup/install.sh [--profile cpu] [--dry-run]
#   LOFT_VENV (default .venv) is the environment; LOFT_CACHE (default ~/.cache/loft) holds llama.cpp and models.
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=cpu
DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --profile) PROFILE="${2:?--profile needs a value}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
done

VENV="${LOFT_VENV:-.venv}"
LOCK="setup/requirements/$PROFILE.txt"
[[ -f "$LOCK" ]] || { echo "install.sh: no lock file $LOCK; profiles: $(ls setup/requirements | sed 's/\.txt//' | tr '\n' ' ')" >&2; exit 2; }
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))' \
  || { echo "install.sh: Python >= 3.11 is required ($PY is $("$PY" --version 2>&1))" >&2; exit 1; }

stamp="$VENV/.loft-installed-$(cat "$LOCK" pyproject.toml | sha256sum | cut -c1-16)"
if [[ $DRY_RUN == 1 ]]; then
  echo "plan: profile=$PROFILE venv=$VENV lock=$LOCK ($(grep -c '==' "$LOCK") pins) python=$("$PY" --version 2>&1)"
  [[ -f "$stamp" ]] && echo "plan: environment already matches the lock" || echo "plan: install the lock into $VENV"
  echo "plan: llama.cpp -> $(bash setup/build_llama_cpp.sh --print-dir)"
  exit 0
fi

if [[ ! -f "$stamp" ]]; then
  echo "setup: installing $LOCK into $VENV (about 5 minutes the first time)"
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  # --no-deps: the lock is the complete set, so pip installs exactly it and resolves nothing.
  "$VENV/bin/python" -m pip install -q --no-deps -r "$LOCK"
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null \
    || "$VENV/bin/python" -m pip install -q --no-deps -e .
  rm -f "$VENV"/.loft-installed-*
  touch "$stamp"
fi

# Pins asserted after install: a silently different torch or axolotl is the commonest breakage.
"$VENV/bin/python" - "$LOCK" <<'PY'
import sys
from importlib.metadata import version
pins = dict(l.strip().split("==", 1) for l in open(sys.argv[1]) if "==" in l and not l.startswith("#"))
bad = [f"{n}: want {want}, have {version(n)}" for n in ("torch", "axolotl", "transformers", "peft")
       if (want := pins.get(n)) and not version(n).startswith(want)]
if bad:
    sys.exit("install.sh: pins do not hold: " + "; ".join(bad) + " (delete .venv and rerun)")
PY

PYTHON="$VENV/bin/python" bash setup/build_llama_cpp.sh
"$VENV/bin/loft" model >/dev/null
echo "setup: ready ($VENV, profile $PROFILE)"
