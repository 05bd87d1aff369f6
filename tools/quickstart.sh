#!/usr/bin/env bash
# Set everything up (./.venv, idempotent) and run the main job: the embedded fine-tuning job of
# tools/train.py (no download needed). Extra arguments go to tools/train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python tools/train.py "$@"
