#!/usr/bin/env bash
# gamma="auto" under another step bound s (λ_W = max(s·(1−m)/LR, floor); round 3's rule is s = 0.16, no floor) on
# the auto cells of `pwsconv reproduce robust --preset medium`: each run is the preset's own seed-0 config with
# --seed N and --method-opt clip_w=λ_W. Resumable: a run with a result.json is skipped. LRS picks the LRs, NETS the
# nets, EXTRA adds options (e.g. EXTRA="--method-opt clip=0.03": λ of α and β).
#   bash benchmarks/auto_step_screen.sh 0.08 results/auto_round4_step008
#   LRS="0.05 0.1 0.4 1.6" bash benchmarks/auto_step_screen.sh 0.08 results/auto_round4_step008 0.005
set -u
step=${1:?step bound, e.g. 0.08}; out_root=${2:?output folder}; floor=${3:-0}
base=${BASE:-results/reproduce/robust_medium_10k}
# a run of an earlier invocation still going: wait for it (it writes its own result.json)
while pgrep -f "pwsconv train .*--out-dir $out_root/" > /dev/null; do sleep 10; done
mkdir -p "$out_root"
for seed in 0 1 2; do for net in ${NETS:-plain residual}; do for lr in ${LRS:-0.05 0.1 0.4 1.6 3.2}; do
  src=$base/lr_${net}_pws_auto_lr${lr}_s0/config.yaml
  out=$out_root/${net}_lr${lr}_s${seed}
  [ -f "$out/result.json" ] && continue
  [ -f "$src" ] || { echo "missing $src"; continue; }
  lw=$(python3 -c "print(round(max($step*0.1/$lr, $floor), 6))")
  rm -rf "$out"
  if pwsconv train --config "$src" --seed "$seed" --method-opt gamma=auto --method-opt clip_w="$lw" ${EXTRA:-} --out-dir "$out" \
       --set name="step${step}_${net}_lr${lr}_s${seed}" --set ckpt_every=0 > "$out.log" 2>&1; then
    echo "$out $(python3 -c "import json;print(json.load(open('$out/result.json'))['metrics'].get('test_acc'))")"
    rm -f "$out.log" "$out/checkpoint.pt"
  else
    echo "$out FAILED (see $out.log)"
  fi
done; done; done
