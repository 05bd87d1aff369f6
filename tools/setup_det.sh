#!/usr/bin/env bash
# Install the detection extra into the project venv (./.venv): mmcv 2.1.0 with compiled ops,
# mmengine 0.10.7, mmdet 3.3.0 and their dependencies.
#
# Why this is a script and not only `pip install .[det]`:
# * mmcv publishes no wheels on PyPI and its 2.1.0 sdist does not build against torch 2.14 as is
#   (it forces -std=c++17; torch 2.14's headers need C++20). tools/build_mmcv.sh builds it once with
#   the flag changed and caches the wheel (~/.cache/visionattn/wheels, or $VISIONATTN_WHEEL_CACHE);
#   this script installs that wheel. A folder of prebuilt wheels ($VISIONATTN_WHEEL_DIR, e.g. the
#   team's ../shared/wheels, which .ci/run uses) is searched first: a wheel there is used only if its
#   name matches the pinned mmcv and this Python, it matches the folder's SHA256SUMS when one exists,
#   and `mmcv.ops` imports against the installed torch after installing it; otherwise the cache/build
#   path runs as before.
# * mmengine's metadata requires `opencv-python`, which would sit beside the project's
#   `opencv-python-headless` (same cv2 package, two owners): mmengine is installed with --no-deps and
#   its real dependencies explicitly.
# * mmengine resolves `mmdet::` config paths with pkg_resources, which setuptools >= 81 removed, and
#   torch 2.14 needs setuptools >= 77.0.3: setuptools is pinned to [77.0.3, 81).
# Idempotent: when nothing changed it only checks a stamp and imports mmcv.ops (a few seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VISIONATTN_VENV:-.venv}
PY="$VENV/bin/python"
stamp="$VENV/.visionattn-det-setup"
want=$(cat setup.cfg tools/setup_det.sh tools/build_mmcv.sh | sha256sum | cut -d' ' -f1)

check() {
  "$PY" - <<'EOF'
import mmcv, mmengine, mmdet
from mmcv.ops import nms  # noqa: F401  (the compiled _ext)
assert (mmcv.__version__, mmengine.__version__, mmdet.__version__) == ('2.1.0', '0.10.7', '3.3.0'), \
    (mmcv.__version__, mmengine.__version__, mmdet.__version__)
EOF
}

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && check 2>/dev/null; then
  exit 0
fi
[ -x "$PY" ] || bash tools/setup.sh
start=$(date +%s)
pip=("$PY" -m pip install -q)
"${pip[@]}" -e '.[det]'   # mmdet's dependencies, declared in setup.cfg
# mmcv-lite (no ops) and mmcv share the `mmcv` package directory: never keep both
"$PY" -m pip uninstall -y -q mmcv-lite 2>/dev/null || true
"${pip[@]}" --no-deps mmengine==0.10.7 mmdet==3.3.0

# The wheel tag this Python accepts for a locally built mmcv (e.g. cp311-cp311-linux_x86_64).
tag=$("$PY" -c 'import sys, sysconfig; v = "cp%d%d" % sys.version_info[:2]; print(f"{v}-{v}-" + sysconfig.get_platform().replace("-", "_").replace(".", "_"))')
prebuilt() {  # prints a verified prebuilt wheel from $VISIONATTN_WHEEL_DIR, or nothing
  local dir=${VISIONATTN_WHEEL_DIR:-} whl
  [ -n "$dir" ] && [ -d "$dir" ] || return 0
  whl="$dir/mmcv-2.1.0-$tag.whl"
  if [ ! -f "$whl" ]; then
    echo "setup_det: no mmcv-2.1.0-$tag.whl in VISIONATTN_WHEEL_DIR=$dir; building/using the cache" >&2
    return 0
  fi
  if [ -f "$dir/SHA256SUMS" ] && ! (cd "$dir" && grep " $(basename "$whl")\$" SHA256SUMS | sha256sum -c --status -); then
    echo "setup_det: $whl does not match $dir/SHA256SUMS; ignoring it" >&2
    return 0
  fi
  echo "$whl"
}
install_mmcv() { "${pip[@]}" --no-deps --force-reinstall "$1" && check 2>/dev/null; }

whl=$(prebuilt)
if [ -n "$whl" ] && install_mmcv "$whl"; then
  echo "setup_det: using prebuilt $whl" >&2
else
  [ -z "$whl" ] || echo "setup_det: prebuilt $whl does not import mmcv.ops against this torch; building instead" >&2
  whl=$(bash tools/build_mmcv.sh | tail -n 1)
  [ -f "$whl" ] || { echo "setup_det: tools/build_mmcv.sh produced no wheel ($whl)" >&2; exit 1; }
  install_mmcv "$whl" || true
fi
check
echo "$want" > "$stamp"
echo "setup_det: mmcv 2.1.0 (ops) + mmengine 0.10.7 + mmdet 3.3.0 ready in $VENV ($(( $(date +%s) - start )) s)" >&2
