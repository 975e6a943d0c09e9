#!/bin/bash
# Longer-schedule check of Table 4's BN-vs-PWS gap (plain net): 10k CIFAR-10 images, 30 epochs, 2000 test images.
# Usage: bash benchmarks/longer_schedule.sh   (resumable: re-running continues unfinished runs, skips finished ones)
cd "$(dirname "$0")/.."
run() {  # method lr
  d=results/longer/$1_lr$2
  [ -f $d/result.json ] && return 0
  OMP_NUM_THREADS=1 python -m pwsconv train --model convpool_cnn_c_small --model-opt width=0.125 --method $1 \
    --dataset cifar10 --limit 10000 --test-limit 2000 --epochs 30 --milestones 15 22 27 --batch-size 128 \
    --lr $2 --momentum 0.9 --weight-decay 5e-4 --seed 0 --num-threads 1 --ckpt-every 0 --no-progress \
    --out-dir $d --resume > $d.log 2>&1
}
(run bn 0.1; run pws 0.1) &
(run bn 0.05; run pws 0.05) &
wait
