#!/usr/bin/env bash
# Download a profile's locked wheels for another machine (Python/platform), for an offline install there:
#   bash setup/wheelhouse.sh PROFILE DIR [--python 3.12] [--platform manylinux_2_28_x86_64] [--dry-run]
#   then, on the offline host:  bash setup/install.sh --profile PROFILE --wheelhouse DIR
# Every wheel is `pip download --only-binary=:all: --no-deps` for the target; the few packages PyPI has only as
# sdists (the lock's `loft-sdist-only` line, e.g. axolotl-contribs-lgpl/mit) are hash-checked and built into
# pure-Python wheels here with `pip wheel --no-deps`. GPU profiles also carry the flash-attn sdist and ninja, for
# `install.sh --build-flash-attn` (fetching that sdist runs its setup.py, which imports torch: .venv's Python is
# used for it; without one it is skipped with a warning). Sizes: cpu ~1 GB, cu128/cu130 ~4-5 GB.
# Env: PYTHON (the pip to run, default python3), LOFT_VENV, NINJA_VERSION, SETUPTOOLS_VERSION. Example:
#   bash setup/wheelhouse.sh cu130 /data/loft-wheels --python 3.12
set -euo pipefail
cd "$(dirname "$0")/.."

NINJA_VERSION="${NINJA_VERSION:-1.13.0}"
# The build backend pyproject.toml names: installing Loft itself (pip install -e .) offline needs it, and a
# Python 3.12 venv has no setuptools at all (3.11's bundled 65.5 is older than pyproject's >=68).
SETUPTOOLS_VERSION="${SETUPTOOLS_VERSION:-80.9.0}"
FLASH_ATTN_REQ=setup/requirements/flash-attn.txt  # the pin and its sdist's sha256
PYPI="https://pypi.org/simple"
CPU_INDEX="https://download.pytorch.org/whl/cpu"
PY="${PYTHON:-python3}"

usage() { sed -n '2,11p' "$0"; }
TARGET_PY=3.12
PLATFORM=manylinux_2_28_x86_64
DRY_RUN=0
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python) TARGET_PY="${2:?--python needs a version like 3.12}"; shift 2 ;;
    --platform) PLATFORM="${2:?--platform needs a tag like manylinux_2_28_x86_64}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "wheelhouse.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
[[ ${#args[@]} -eq 2 ]] || { usage >&2; exit 2; }
PROFILE="${args[0]}"
DEST="${args[1]}"
LOCK="setup/requirements/$PROFILE.txt"
[[ -f $LOCK ]] || { echo "wheelhouse.sh: no lock $LOCK (profiles: cpu cu128 cu130)" >&2; exit 2; }
[[ $TARGET_PY =~ ^3\.[0-9]+$ ]] || { echo "wheelhouse.sh: --python wants X.Y, got $TARGET_PY" >&2; exit 2; }
[[ $PLATFORM =~ ^manylinux_2_([0-9]+)_x86_64$ ]] \
  || { echo "wheelhouse.sh: --platform wants manylinux_2_NN_x86_64, got $PLATFORM" >&2; exit 2; }

# pip matches wheels by the tags given: the target glibc's and every older manylinux tag it can run.
glibc_minor="${BASH_REMATCH[1]}"
plat=()
for ((m = glibc_minor; m >= 17; m--)); do plat+=(--platform "manylinux_2_${m}_x86_64"); done
plat+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64)
target=(--only-binary=:all: --python-version "$TARGET_PY" --implementation cp "${plat[@]}")
torch_index="$(sed -n 's/^# loft-torch-index: *//p' "$LOCK")"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$PY" setup/plan.py pins "$LOCK" --wheels-only --exclude torch --hashes >"$work/wheels.txt"
"$PY" setup/plan.py pins "$LOCK" --sdist-only --hashes >"$work/sdists.txt"
"$PY" setup/plan.py pins "$LOCK" --exclude torch >"$work/constraints.txt"
torch_pin="$("$PY" setup/plan.py pins "$LOCK" --only torch --hashes)"
case "$PROFILE" in
  cpu) torch_pin="torch==$("$PY" setup/plan.py pins "$LOCK" --only torch | cut -d= -f3)+cpu" ;;
esac

# Hashes make pip check every download (pip turns --require-hashes on when a file has them).
steps=(
  "pip download --no-deps ${target[*]} -d $DEST -r <$LOCK: wheels>"
  "pip wheel --no-deps -w $DEST -r <$LOCK: sdist-only: $(cut -d' ' -f1 "$work/sdists.txt" | paste -sd' ')>"
  "pip download --no-deps --only-binary=:all: -d $DEST setuptools==$SETUPTOOLS_VERSION   (Loft's own build backend)"
)
case "$PROFILE" in
  cu128) steps+=("pip download ${target[*]} --index-url $torch_index --extra-index-url $PYPI -c <lock> -d $DEST torch==${torch_pin%% *}   (with its CUDA 12 wheels)") ;;
  cpu) steps+=("pip download --no-deps ${target[*]} --extra-index-url $CPU_INDEX -d $DEST $torch_pin") ;;
  *) steps+=("pip download --no-deps ${target[*]} -d $DEST ${torch_pin%% *}   (hash-checked)") ;;
esac
[[ $PROFILE == cpu ]] || steps+=("pip download --no-deps --no-binary :all: --no-build-isolation -d $DEST $(grep -o '^flash-attn==[0-9.]*' "$FLASH_ATTN_REQ") (hash-checked); pip download --no-deps ${target[*]} -d $DEST ninja==$NINJA_VERSION")
echo "wheelhouse: $PROFILE for Python $TARGET_PY on $PLATFORM into $DEST"
printf '  %s\n' "${steps[@]}"
[[ $DRY_RUN == 1 ]] && exit 0

mkdir -p "$DEST"
pip=("$PY" -m pip)
"${pip[@]}" download -q --no-deps "${target[@]}" -d "$DEST" -r "$work/wheels.txt"
if [[ -s $work/sdists.txt ]]; then
  DS_BUILD_OPS=0 "${pip[@]}" wheel -q --no-deps -w "$work/built" -r "$work/sdists.txt"  # DeepSpeed: pure Python
  for whl in "$work"/built/*.whl; do
    [[ $whl == *-py3-none-any.whl || $whl == *-py2.py3-none-any.whl ]] \
      || { echo "wheelhouse.sh: $(basename "$whl") is not pure Python: build it on the target instead" >&2; exit 1; }
  done
  cp "$work"/built/*.whl "$DEST/"
fi
"${pip[@]}" download -q --no-deps --only-binary=:all: -d "$DEST" "setuptools==$SETUPTOOLS_VERSION"
case "$PROFILE" in
  cu128)
    "${pip[@]}" download -q "${target[@]}" --index-url "$torch_index" --extra-index-url "$PYPI" \
      -c "$work/constraints.txt" -d "$DEST" "${torch_pin%% *}" ;;
  cpu)
    "${pip[@]}" download -q --no-deps "${target[@]}" --extra-index-url "$CPU_INDEX" -d "$DEST" "$torch_pin" ;;
  *)
    echo "$torch_pin" >"$work/torch.txt"
    "${pip[@]}" download -q --no-deps "${target[@]}" -d "$DEST" -r "$work/torch.txt" ;;
esac
if [[ $PROFILE != cpu ]]; then
  "${pip[@]}" download -q --no-deps "${target[@]}" -d "$DEST" "ninja==$NINJA_VERSION"
  fa_py="${LOFT_VENV:-.venv}/bin/python"
  [[ -x $fa_py ]] || fa_py="$PY"
  FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE "$fa_py" -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
    -d "$DEST" -r "$FLASH_ATTN_REQ" \
    || echo "wheelhouse.sh: warning: no flash-attn sdist (its setup.py needs torch importable by $fa_py); only --build-flash-attn needs it" >&2
fi
printf 'profile=%s\npython=%s\nplatform=%s\nlock_sha256=%s\n' "$PROFILE" "$TARGET_PY" "$PLATFORM" \
  "$(sha256sum "$LOCK" | cut -c1-64)" >"$DEST/loft-wheelhouse.txt"
echo "wheelhouse: $(find "$DEST" -name '*.whl' | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
echo "wheelhouse: offline install: bash setup/install.sh --profile $PROFILE --wheelhouse $DEST"
