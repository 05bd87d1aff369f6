#!/usr/bin/env bash
# Build mmcv 2.1.0 with compiled ops against torch 2.14.1, once, into a wheel cache.
#
# Why: mmcv publishes no wheels for torch 2.14 on PyPI, and its sdist passes -std=c++14/17 while
# torch 2.14's headers need C++20. We download the sdist, switch the flag to -std=c++20 and build
# with MMCV_WITH_OPS=1 in a throw-away build venv (the recipe needs setuptools<70, which must not
# leak into the project venv: torch 2.14 wants setuptools>=77 at run time). The build takes 25-45
# minutes on 2 cores, so the wheel is cached in $VISIONATTN_WHEEL_CACHE (default
# ~/.cache/visionattn/wheels) and reused by later setups.
# Usage: tools/build_mmcv.sh   -> prints the path of the cached wheel on stdout.
set -euo pipefail
MMCV_VERSION=2.1.0
TORCH_VERSION=2.14.1
CACHE=${VISIONATTN_WHEEL_CACHE:-$HOME/.cache/visionattn/wheels}
DEST="$CACHE/mmcv-$MMCV_VERSION-torch$TORCH_VERSION"
mkdir -p "$DEST"
existing=$(ls "$DEST"/mmcv-*.whl 2>/dev/null | head -n 1 || true)
if [ -n "$existing" ]; then
  echo "$existing"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
python3 -m venv "$work/venv"
bpip=("$work/venv/bin/python" -m pip install -q)
"${bpip[@]}" "torch==$TORCH_VERSION" >&2
"${bpip[@]}" 'setuptools<70' wheel ninja numpy >&2
"$work/venv/bin/python" -m pip download -q --no-binary :all: --no-deps "mmcv==$MMCV_VERSION" -d "$work" >&2
tar -xzf "$work/mmcv-$MMCV_VERSION.tar.gz" -C "$work"
src="$work/mmcv-$MMCV_VERSION"
sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$src/setup.py"
(cd "$src" && MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  "$work/venv/bin/python" -m pip wheel -q --no-build-isolation --no-deps . -w "$work/dist" >&2)
whl=$(ls "$work"/dist/mmcv-*.whl)
cp "$whl" "$DEST/.partial"
mv "$DEST/.partial" "$DEST/$(basename "$whl")"   # atomic: a half-copied wheel is never picked up
echo "mmcv $MMCV_VERSION built in $(( $(date +%s) - start )) s" >&2
echo "$DEST/$(basename "$whl")"
