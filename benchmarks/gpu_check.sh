#!/usr/bin/env bash
# Every GPU figure of issue 17 in one call, in under 7 minutes: JSON plus a table.
#
#   benchmarks/gpu_check.sh [OUT]        # default OUT: gpu-check/  (needs a CUDA device)
#
# Writes OUT/gpu_check.json and OUT/gpu_check.md (see benchmarks/gpu_check.py for the parts).
# GPU_CHECK_SECONDS (default 400) bounds the whole run; GPU_CHECK_DEVICE=cpu GPU_CHECK_TINY=1
# is the CPU smoke run the test suite makes. PYTHON picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-check}"
args=(--device "${GPU_CHECK_DEVICE:-cuda}" --out "$out" --seconds "${GPU_CHECK_SECONDS:-400}")
if [[ -n "${GPU_CHECK_TINY:-}" ]]; then
    args+=(--tiny)
fi
if [[ -n "${GPU_CHECK_PARTS:-}" ]]; then
    args+=(--parts "$GPU_CHECK_PARTS")
fi
export AUTOML_TL_LOAD_PLUGINS="${AUTOML_TL_LOAD_PLUGINS-}"
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "${args[@]}"
