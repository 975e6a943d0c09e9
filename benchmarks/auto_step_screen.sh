#!/usr/bin/env bash
# gamma="auto" under another step bound s (λ_W = s·(1−m)/LR; the library's default is AUTO_STEP = 0.16) on every
# auto cell of `pwsconv reproduce robust --preset medium`: each run is the preset's own seed-0 config with
# --seed N and --method-opt clip_w=λ_W. Resumable: a run with a result.json is skipped.
#   bash benchmarks/auto_step_screen.sh 0.08 results/auto_round4_step008
set -u
step=${1:?step bound, e.g. 0.08}; out_root=${2:?output folder}
base=${3:-results/reproduce/robust_medium}
mkdir -p "$out_root"
for seed in 0 1 2; do for net in plain residual; do for lr in 0.05 0.1 0.4 1.6 3.2; do
  src=$base/lr_${net}_pws_auto_lr${lr}_s0/config.yaml
  out=$out_root/${net}_lr${lr}_s${seed}
  [ -f "$out/result.json" ] && continue
  [ -f "$src" ] || { echo "missing $src"; continue; }
  lw=$(python3 -c "print(round($step*0.1/$lr, 6))")
  rm -rf "$out"
  if pwsconv train --config "$src" --seed "$seed" --method-opt gamma=auto --method-opt clip_w="$lw" --out-dir "$out" \
       --set name="step${step}_${net}_lr${lr}_s${seed}" --set ckpt_every=0 > "$out.log" 2>&1; then
    echo "$out $(python3 -c "import json;print(json.load(open('$out/result.json'))['metrics'].get('test_acc'))")"
    rm -f "$out.log" "$out/checkpoint.pt"
  else
    echo "$out FAILED (see $out.log)"
  fi
done; done; done
