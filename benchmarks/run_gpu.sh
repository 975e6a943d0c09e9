#!/usr/bin/env bash
# Every benchmark suite on a CUDA GPU in one call (the GPU targets of BENCHMARKS.md), results in
# results/benchmarks/gpu/<suite>/ (results.json + results.md, the GPU named in "machine").
# Sized to finish in well under 10 minutes on one H100/H200; pass a smaller REPEATS to go faster.
#   bash benchmarks/run_gpu.sh            # needs torch with CUDA and `pip install -e .`
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA device')"
REPEATS=${REPEATS:-25}
OUT=results/benchmarks/gpu
B=benchmarks/bench_methods.py
ALL="none bn gn in ln sn wn ws sws mabn pws"
python $B --device cuda --suite train --models resnet_cifar convpool_cnn_c vgg16 --methods $ALL \
  --batch-sizes 2 8 32 128 --repeats "$REPEATS" --out $OUT/train
python $B --device cuda --suite train --models resnet50 --image 224 --methods none bn gn sn wn ws pws \
  --batch-sizes 2 8 32 --repeats "$REPEATS" --out $OUT/train_resnet50_224
python $B --device cuda --suite infer fold --models resnet_cifar convpool_cnn_c --batch-sizes 2 32 128 \
  --repeats "$((REPEATS * 2))" --out $OUT/infer
python $B --device cuda --suite memory --models resnet_cifar convpool_cnn_c resnet50 --methods $ALL \
  --batch-sizes 2 8 32 128 --out $OUT/memory
python $B --device cuda --suite scaling floor probe --models resnet_cifar --batch-sizes 32 \
  --repeats "$REPEATS" --out $OUT/scaling
echo "done: $OUT"
