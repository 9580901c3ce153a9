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
if [ -z "${OPD_TORCH:-}" ]; then
  # CPU: torch's CPU build, and the Triton release whose interpreter the kernel tests are verified on
  python -m pip install -q "torch==2.13.0" "triton==3.7.1"
else
  python -m pip install -q "$OPD_TORCH"
fi
python -m pip install -q -e ".[test]"
echo "megatron_opd installed in $(pwd)/.venv"
