#!/usr/bin/env bash
# Every GPU-side measurement of issue 15 in one call, <= 9 minutes on one H200 (torch 2.11, no
# network): the LSQ kernel tests marked gpu, train_step (floor arms and the gradient check) for
# ResNet-50 and ViT-B/16, quantize_cost, bev_scale. Each section has its own time limit and writes
# its JSON under $OUT as it goes, so a section cut short still leaves what it measured.
#   OUT=/some/dir bash bench/gpu_issue15.sh
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=16
OUT=${OUT:?set OUT to the results folder}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
timeout 70 python3 -m pytest -q -m gpu -p no:cacheprovider tests/runtime/test_lsq_kernels.py \
  --junitxml="$OUT/kernel_tests.xml" > "$OUT/kernel_tests.txt" 2>&1; echo "kernel tests rc=$?"
tail -3 "$OUT/kernel_tests.txt"
timeout 260 python3 bench/train_step.py --device cuda --arms fp32 floor ptqat_small_0.5 ours_qat floor_all \
  --compile-arms fp32 floor ptqat_small_0.5 ours_qat --observer minmax --calib-batches 1 \
  --warmup 3 --steps 10 --budget-s 200 --out "$OUT/train_step.json" > "$OUT/train_step.txt" 2>&1
echo "train_step rc=$?"; grep '^|' "$OUT/train_step.txt" | tail -24
timeout 90 python3 bench/quantize_cost.py --device cuda --out "$OUT/quantize_cost_gpu.json" \
  > "$OUT/quantize_cost.txt" 2>&1; echo "quantize_cost rc=$?"; grep '^|' "$OUT/quantize_cost.txt"
timeout 110 python3 bench/bev_scale.py --device cuda --batch 2 --warmup 2 --steps 5 --compile-arms ptqat qat \
  --time-budget-s 60 --out "$OUT/bev_scale.json" > "$OUT/bev_scale.txt" 2>&1
echo "bev_scale rc=$?"; grep '^|' "$OUT/bev_scale.txt"
