#!/usr/bin/env bash
# gamma="auto" at real scale in one call: `pwsconv reproduce robust --preset gpu` (ResNet-20 and ConvPool-CNN-C on all
# 50,000 CIFAR-10 training images, LR 0.05/0.1 for 20 epochs and 0.4/1.6/3.2 for 5, BN / paper PWS / auto + ablation
# rows), several runs sharing the GPU (--jobs), inside a hard wall-clock budget. The runs' files (no checkpoints)
# are packed into $OUT/robust_gpu.tgz every 20 s and at the end, so a run stopped by the budget still returns what
# finished; re-running on the same --out resumes.
#   bash benchmarks/gpu_robust.sh [BUDGET_S=330] [JOBS=14]      (CIFAR-10 under $PWSCONV_DATA/cifar10)
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${1:-330}
JOBS=${2:-14}
DEST=${OUT:-results/reproduce}
RUNS=${ROBUST_DIR:-/tmp/robust_gpu}
mkdir -p "$DEST" "$RUNS"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
pack() { tar czf "$DEST/robust_gpu.tgz.tmp" --exclude='*.pt' --exclude='.lock' -C "$(dirname "$RUNS")" \
           "$(basename "$RUNS")" 2>/dev/null && mv "$DEST/robust_gpu.tgz.tmp" "$DEST/robust_gpu.tgz"; }
# decode the CIFAR-10 archive once, before the jobs start (each would otherwise decode it)
"$PY" -c "from pwsconv.data import load_dataset as L; L('cifar10'); print('CIFAR-10 decoded')" 2>&1 \
  | tail -1
( while sleep 20; do pack; done ) &
PACKER=$!
timeout -k 10 "$BUDGET" "$PY" -m pwsconv reproduce robust --preset "${ROBUST_PRESET:-gpu}" --jobs "$JOBS" --out "$RUNS" 2>&1 \
  | tee "$DEST/robust_gpu.log" | grep -v "^\s*$" | tail -60
rc=${PIPESTATUS[0]}
kill "$PACKER" 2>/dev/null
pack
echo "gpu_robust.sh: exit $rc ($(ls "$RUNS" | wc -l) entries in $RUNS)"
exit 0
