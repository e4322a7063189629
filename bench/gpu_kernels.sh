#!/usr/bin/env bash
# The fused LSQ kernels on a GPU (issue 15), one H200 with torch 2.11, no network. Sections, each
# with its own time limit, each writing under $OUT as it goes:
#   kernels   the kernel tests on CUDA, compiled Triton, not the interpreter (~30 s)
#   compile   tests/test_compile_gpu.py: eager against compiled gradients (~60-120 s, inductor)
#   division  bench/lsq_division.py: clip-mask flips of inductor's division against the custom op (~20 s)
#   train     bench/train_step.py, eager, ResNet-50 and ViT-B/16, fp32 / floor / floor_all / PTQAT / full QAT,
#             each quantized arm with the kernels on and off (~90 s)
# All four by default; name some to run only those:
#   OUT=/some/dir bash bench/gpu_kernels.sh                 # all, ~4 minutes
#   OUT=/some/dir bash bench/gpu_kernels.sh kernels division train   # ~2.5 minutes
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=16
OUT=${OUT:?set OUT to the results folder}
SECTIONS=${*:-kernels compile division train}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
for section in $SECTIONS; do
  case $section in
    kernels)
      # "not slow" replaces the default "not slow and not gpu": the CUDA tests run, the
      # interpreter's skip (no TRITON_INTERPRET where CUDA is present).
      timeout 90 python3 -m pytest -q -rs -m "not slow" -p no:cacheprovider tests/runtime/test_lsq_kernels.py \
        --junitxml="$OUT/kernel_tests.xml" > "$OUT/kernel_tests.txt" 2>&1
      echo "kernel tests rc=$?"; tail -4 "$OUT/kernel_tests.txt" ;;
    compile)
      timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_compile_gpu.py \
        --junitxml="$OUT/compile_gpu.xml" > "$OUT/compile_gpu.txt" 2>&1
      echo "compile gpu tests rc=$?"; grep -E "^(FAILED|E  )|passed|failed" "$OUT/compile_gpu.txt" | tail -8 ;;
    division)
      timeout 60 python3 bench/lsq_division.py --device cuda --out "$OUT/lsq_division.json" \
        > "$OUT/lsq_division.txt" 2>&1
      echo "lsq_division rc=$?"; grep '^|' "$OUT/lsq_division.txt" ;;
    train)
      timeout 170 python3 bench/train_step.py --device cuda --arms fp32 floor floor_all ptqat_small_0.5 ours_qat \
        --kernels-off-too --observer minmax --calib-batches 1 --warmup 3 --steps 10 --budget-s 140 \
        --out "$OUT/train_step_kernels.json" > "$OUT/train_step_kernels.txt" 2>&1
      echo "train_step rc=$?"; grep '^|' "$OUT/train_step_kernels.txt" ;;
    *) echo "unknown section $section (kernels, compile, division, train)"; exit 2 ;;
  esac
done
