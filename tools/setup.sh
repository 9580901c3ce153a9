#!/usr/bin/env bash
# Set up megatron_opd in ./.venv on a fresh machine (CPU or GPU). Idempotent.
#   bash tools/setup.sh            # CPU: torch 2.13.0 CPU build (a bare `torch` would pull CUDA)
#   OPD_TORCH=torch bash tools/setup.sh   # GPU machines: let pip pick the CUDA build
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "${OPD_TORCH:-torch==2.13.0}"
python -m pip install -q -e ".[test]"
echo "megatron_opd installed in $(pwd)/.venv"
