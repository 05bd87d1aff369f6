#!/usr/bin/env bash
# Set up the environment if needed, then run the test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
bash tools/setup_det.sh   # mmcv (cached wheel; built once), mmengine, mmdet for tests/test_det.py
# OpenMP threads that spin while waiting starve each other on a loaded 2-core machine.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
# two workers (pytest-xdist): about 1750 tests in 20-24 min on 2 idle cores (fresh-clone CI runs, 2026-12-07;
# the same suite varies by ~15% between runs on this machine)
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" "$@"
