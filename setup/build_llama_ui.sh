#!/usr/bin/env bash
# Build llama-server's chat web page once, from the pinned llama.cpp tree the tools are built from
# (setup/llama_cpp_source.sh), and cache it in $LOFT_CACHE/llama-ui/<pin>/ (apart from the tools' folder).
# `loft serve MODEL.gguf` has llama-server serve it (--path) and prints its address.
#
# This llama.cpp no longer ships the page prebuilt: its build either runs npm or downloads it from a Hugging Face
# bucket, and no hub is reachable here. So npm builds it from the tree's own package-lock.json (npm ci: exact
# versions). --ignore-scripts: no package's install hook runs; the page's build does not need any.
# Usage: bash setup/build_llama_ui.sh [--print-dir]. Needs node >= 20 and npm (Debian: apt-get install nodejs npm).
# Cold: ~700 MB of node_modules in a temp dir (deleted), ~3 min on 2 cores; the page itself is ~10 MB.
set -euo pipefail
# shellcheck source=setup/llama_cpp_source.sh
source "$(dirname "$0")/llama_cpp_source.sh"
CACHE="${LOFT_CACHE:-$HOME/.cache/loft}"
DEST="$CACHE/llama-ui/$LLAMA_CPP_PYTHON_VERSION"
PY="${PYTHON:-python3}"

case "${1:-}" in
  --print-dir) echo "$DEST"; exit 0 ;;
  -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
  "") ;;
  *) echo "build_llama_ui.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
esac

if [[ -f $DEST/index.html ]]; then
  echo "llama.cpp web UI: cached in $DEST"
  exit 0
fi
for tool in node npm; do
  command -v "$tool" >/dev/null || { echo "build_llama_ui.sh: $tool not found; install it (Debian: apt-get install nodejs npm)" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "llama.cpp web UI: fetching the llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist"
fetch_llama_cpp "$work" tools/ui
ui="$LLAMA_CPP_TREE/tools/ui"
echo "llama.cpp web UI: npm ci + build (about 3 minutes)"
(cd "$ui" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >"$work/npm-ci.log" 2>&1) \
  || { tail -20 "$work/npm-ci.log" >&2; echo "build_llama_ui.sh: npm ci failed" >&2; exit 1; }
(cd "$ui" && npm run build >"$work/build.log" 2>&1) \
  || { tail -20 "$work/build.log" >&2; echo "build_llama_ui.sh: npm run build failed" >&2; exit 1; }
[[ -f $ui/dist/index.html ]] || { echo "build_llama_ui.sh: the build wrote no dist/index.html" >&2; exit 1; }

# Install atomically: index.html is what the check above looks for.
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST.stage-$$"; cp -r "$ui/dist" "$DEST.stage-$$"
rm -rf "$DEST"; mv "$DEST.stage-$$" "$DEST"
echo "llama.cpp web UI: built into $DEST"
