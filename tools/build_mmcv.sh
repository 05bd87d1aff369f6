#!/usr/bin/env bash
# Build mmcv 2.1.0 with compiled ops against the torch of the active Python, once, into a wheel cache.
#
# Why: mmcv publishes no wheels for torch 2.14 on PyPI, and its sdist passes -std=c++14/17 while
# torch 2.14's headers need C++20. We download the sdist, switch the flag to -std=c++20 and build
# with MMCV_WITH_OPS=1. The build takes 25-45 minutes on 2 cores, so the wheel is cached in
# $VISIONATTN_WHEEL_CACHE (default ~/.cache/visionattn/wheels) and reused by later setups.
# Usage: tools/build_mmcv.sh [python]   -> prints the path of the cached wheel.
set -euo pipefail
PY=${1:-python}
MMCV_VERSION=2.1.0
CACHE=${VISIONATTN_WHEEL_CACHE:-$HOME/.cache/visionattn/wheels}
TORCH_TAG=$("$PY" -c 'import torch; print(torch.__version__.replace("+", "_"))')
DEST="$CACHE/mmcv-$MMCV_VERSION-torch$TORCH_TAG"
mkdir -p "$DEST"
existing=$(ls "$DEST"/mmcv-*.whl 2>/dev/null | head -n 1 || true)
if [ -n "$existing" ]; then
  echo "$existing"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip install -q 'setuptools<70' wheel ninja >&2
"$PY" -m pip download -q --no-binary :all: --no-deps "mmcv==$MMCV_VERSION" -d "$work" >&2
tar -xzf "$work"/mmcv-"$MMCV_VERSION".tar.gz -C "$work"
src="$work/mmcv-$MMCV_VERSION"
sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$src/setup.py"
start=$(date +%s)
(cd "$src" && MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip wheel -q --no-build-isolation --no-deps . -w "$work/dist" >&2)
cp "$work"/dist/mmcv-*.whl "$DEST/.tmp.whl.part"
whl_name=$(basename "$work"/dist/mmcv-*.whl)
mv "$DEST/.tmp.whl.part" "$DEST/$whl_name"
echo "mmcv $MMCV_VERSION built in $(( $(date +%s) - start )) s" >&2
echo "$DEST/$whl_name"
