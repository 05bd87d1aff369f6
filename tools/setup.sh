#!/usr/bin/env bash
# Create/refresh the project's virtual environment in ./.venv (git-ignored) and install visionattn.
# Idempotent: when setup.cfg and this script are unchanged since the last successful run, it only
# checks the stamp and returns in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VISIONATTN_VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.visionattn-setup"
want=$(cat setup.cfg tools/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c 'import visionattn' 2>/dev/null; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q)
# torch first (2.14.1, the CUDA 13 build on the local package disk; runs on the CPU without a GPU), then the package.
"${pip[@]}" torch==2.14.1 torchvision==0.29.1
"${pip[@]}" -e '.[train,test]'
echo "$want" > "$stamp"
echo "visionattn environment ready in $VENV" >&2
