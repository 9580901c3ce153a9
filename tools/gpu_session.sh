#!/usr/bin/env bash
# What to run whenever a GPU is at hand, most important first (docs/gpu.md). Each part writes its
# record and log into $OUT (default bench/results/gpu_session):
#   selftest  opd selftest --device cuda                      selftest.json, selftest.log   (~2 min)
#   demo      opd train configs/demo/cpu.yaml on the GPU      demo_summary.json, demo_metrics.jsonl, demo.log
#             (bf16, Ray, embedded engine, student/teacher/reference groups colocated)   (~2 min)
#   loop      tools/gpu_loop.py: Qwen3-1.7B student, Qwen3-30B-A3B teacher cut to 8 layers, random
#             weights, packed 8K-token micro-batches, 3 steps     loop.json, loop.log    (~6 min)
#
#   bash tools/gpu_session.sh [all | selftest demo loop ...]       (default: all)
#
# Python packages missing on the machine (no package index there) go into .whl/ beforehand as wheels
# (megatron-core, OmegaConf, math-verify, Ray and their needs); they are installed into /tmp/site
# first. The demo's assets are built under .cache/opd_demo when absent (about 85 s): bring them along.
# Exit code: the number of parts that failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 100
  export PYTHONPATH=/tmp/site:$PYTHONPATH PATH=/tmp/site/bin:$PATH
fi
PY=${PYTHON:-python3}
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] || [ "${PARTS[0]}" = all ] && PARTS=(selftest demo loop)
failed=0
for part in "${PARTS[@]}"; do
  echo "=== $part ($(date -u +%H:%M:%S))"
  case $part in
    selftest)
      timeout 300 $PY -m megatron_opd.cli selftest --device "${SELFTEST_DEVICE:-cuda}" --json "$OUT/selftest.json" 2>&1 \
        | tee "$OUT/selftest.log"
      rc=${PIPESTATUS[0]}
      ;;
    demo)
      run=/tmp/opd_gpu_demo && rm -rf "$run"
      timeout 540 $PY -m megatron_opd.cli train configs/demo/cpu.yaml run_dir="$run" logging.progress_bar=false \
        ${DEMO_OVERRIDES:-} 2>&1 | tee "$OUT/demo.log"
      rc=${PIPESTATUS[0]}
      if [ -f "$run/summary.json" ]; then cp "$run/summary.json" "$OUT/demo_summary.json"; cp "$run/metrics.jsonl" "$OUT/demo_metrics.jsonl"; fi
      ;;
    loop)
      timeout 560 $PY tools/gpu_loop.py --work-dir /tmp/opd_gpu_loop --results "$OUT/loop.json" ${LOOP_ARGS:-} 2>&1 \
        | tee "$OUT/loop.log"
      rc=${PIPESTATUS[0]}
      ;;
    *)
      echo "unknown part $part (selftest, demo, loop, all)" >&2
      rc=2
      ;;
  esac
  echo "=== $part exit $rc"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
done
exit $failed
