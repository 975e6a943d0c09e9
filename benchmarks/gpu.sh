#!/usr/bin/env bash
# The GPU benchmark in one call, inside a hard wall-clock budget (start-up included): builds and warms every case,
# then interleaved rounds, a `pwsconv train` epoch timing, and torch.compile last (benchmarks/gpu_bench.py says what
# it measures). Results are written as it goes to $OUT (else results/benchmarks/gpu): gpu_bench.json, gpu_bench.md
# (tables of ratios), gpu_bench.log.
#   bash benchmarks/gpu.sh                 # 480 s budget on a CUDA machine
#   bash benchmarks/gpu.sh 300 --skip compile
#   bash benchmarks/gpu.sh --dry           # CPU, tiny sizes, seconds
set -uo pipefail
START=$(date +%s.%N)
cd "$(dirname "$0")/.."
BUDGET=480
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then BUDGET=$1; shift; fi
DEST=${OUT:-results/benchmarks/gpu}
mkdir -p "$DEST"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
command -v "$PY" >/dev/null || PY=python3
# the hard stop: a few seconds inside the budget (the script itself keeps a reserve and writes as it goes)
timeout -k 5 $((BUDGET - 3)) "$PY" benchmarks/gpu_bench.py --budget "$BUDGET" --started-at "$START" --out "$DEST" \
  "$@" 2>&1 | tee "$DEST/gpu_bench.log"
rc=${PIPESTATUS[0]}
[[ $rc == 124 ]] && echo "gpu.sh: stopped at the $BUDGET s budget; results so far in $DEST" >&2
exit "$rc"
