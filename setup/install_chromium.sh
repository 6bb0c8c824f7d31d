#!/usr/bin/env bash
# Headless Chromium from Debian's `chromium` package, for the browser tests (llama-server's chat page, report.html).
# Idempotent: nothing happens when `chromium` is already on PATH. No browser is downloaded from anywhere else.
# Usage: bash setup/install_chromium.sh   (make setup-serve; runs apt-get through sudo unless root)
set -euo pipefail

if command -v chromium >/dev/null; then
  echo "chromium: installed ($(command -v chromium))"
  exit 0
fi
command -v apt-get >/dev/null \
  || { echo "install_chromium.sh: no apt-get here; install Chromium with this system's package manager" >&2; exit 1; }
sudo=()
[[ $(id -u) == 0 ]] || sudo=(sudo)
echo "chromium: installing Debian's package (about 1 minute)"
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq chromium >/dev/null
command -v chromium >/dev/null || { echo "install_chromium.sh: apt-get ran but there is no chromium on PATH" >&2; exit 1; }
echo "chromium: installed"
