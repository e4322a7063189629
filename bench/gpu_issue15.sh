#!/usr/bin/env bash
# The GPU-side measurements of issue 15 on one H200 (torch 2.11, no network), in sections that
# each have their own time limit and write their JSON under $OUT as they go:
#   compile  tests/test_compile_gpu.py: eager against compiled gradients (~90 s)
#   train    bench/train_step.py, ResNet-50 and ViT-B/16: fp32 / floor / floor_all / PTQAT / full QAT
#            eager, fp32 / floor / PTQAT / full QAT compiled, each after its gradient check (<= 400 s)
#   qcost    bench/quantize_cost.py on CUDA, warm (one untimed quantize() first) (<= 150 s)
#   bev      bench/bev_scale.py at real size: fp32 / full QAT / PTQAT, eager and compiled (<= 540 s)
# One device call holds at most 10 minutes, so run them in two:
#   OUT=/some/dir bash bench/gpu_issue15.sh train qcost
#   OUT=/some/dir bash bench/gpu_issue15.sh bev
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=16 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:?set OUT to the results folder}
SECTIONS=${*:?name the sections: compile train qcost bev}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
for section in $SECTIONS; do
  case $section in
    compile)
      timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_compile_gpu.py \
        --junitxml="$OUT/compile_gpu.xml" > "$OUT/compile_gpu.txt" 2>&1
      echo "compile gpu tests rc=$?"; grep -E "^(FAILED|E  )|passed|failed" "$OUT/compile_gpu.txt" | tail -8 ;;
    train)
      timeout 400 python3 bench/train_step.py --device cuda --arms fp32 floor floor_all ptqat_small_0.5 ours_qat \
        --compile-arms fp32 floor ptqat_small_0.5 ours_qat --observer minmax --calib-batches 1 \
        --warmup 3 --steps 10 --budget-s 330 --out "$OUT/train_step.json" > "$OUT/train_step.txt" 2>&1
      echo "train_step rc=$?"; grep '^|' "$OUT/train_step.txt" ;;
    qcost)
      timeout 150 python3 bench/quantize_cost.py --device cuda --warm --mse-elements 0 \
        --out "$OUT/quantize_cost_gpu.json" > "$OUT/quantize_cost.txt" 2>&1
      echo "quantize_cost rc=$?"; grep '^|' "$OUT/quantize_cost.txt" ;;
    bev)
      timeout 540 python3 bench/bev_scale.py --device cuda --batch 2 --warmup 2 --steps 6 \
        --time-budget-s 360 --out "$OUT/bev_scale.json" > "$OUT/bev_scale.txt" 2>&1
      echo "bev_scale rc=$?"; grep '^|' "$OUT/bev_scale.txt" ;;
    *) echo "unknown section $section (compile, train, qcost, bev)"; exit 2 ;;
  esac
done
