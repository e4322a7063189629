#!/usr/bin/env bash
# Issue 17's evidence in one H200 call: the Fashion-MNIST grid (2 models x 3 bit settings x
# 3 seeds x 19 arms, FP models trained first if no checkpoint exists), its learning curve, and
# the BEV detection grid (4 stand-ins), all sharing the GPU, each resuming from the JSON under
# docs/ and stopping before a cell that would end after SECONDS. Everything comes back as
# $OUT/evidence.tgz; docs/results.md says how each table is made from it.
#
#   OUT=/some/dir SECONDS_BUDGET=500 bash examples/gpu_evidence.sh
#
# FMNIST_WORKERS (5), BEV_MODELS ("bevdet bevdepth4d bevformer sparsebev"), BEV_SEEDS ("0 1 2")
# and BEV_BITS ("W4A8 W4A4 W3A3") choose how the call's time is shared; BEV_MODELS="" skips BEV.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
budget=${SECONDS_BUDGET:-500}
work=$(mktemp -d)
mkdir -p "$work/fmnist" "$work/curve" "$work/bev"
# Fashion-MNIST grid: the parent trains the FP checkpoints, then 5 workers share the (bits, seed) groups.
OUT=$work/fmnist python3 -m examples.fashion_mnist.gpu_run --seconds "$budget" --workers "${FMNIST_WORKERS:-5}" \
    > "$work/fmnist.log" 2>&1 &
# The learning curve needs the CNN's checkpoint: wait for the grid's parent to write it.
start=$(date +%s)
(
  [ -f docs/results_fmnist_curve.json ] && cp docs/results_fmnist_curve.json "$work/curve/curve.json"
  ckpt=examples/checkpoints/fmnist_resnet.pt
  [ -f $ckpt ] || { until [ -f "$work/fmnist/fmnist_resnet.pt" ]; do sleep 5; done; sleep 5;
                    cp "$work/fmnist/fmnist_resnet.pt" "$work/curve/"; }
  OUT=$work/curve python3 -m examples.fashion_mnist.gpu_run --curve --models resnet --bits W3A3 \
      --seconds $((budget - $(date +%s) + start)) > "$work/curve.log" 2>&1
) &
# BEV detection: one process per (model, seed), each through the bit settings in order, so that
# the first bit setting gets all three seeds before the next one starts.
for model in ${BEV_MODELS-bevdet bevdepth4d bevformer sparsebev}; do
  for seed in ${BEV_SEEDS:-0 1 2}; do
    part=$work/bev/${model}_s$seed.json
    [ -f docs/results_bev.json ] && cp docs/results_bev.json "$part"
    python3 -m examples.experiment run --task bev-$model --bits ${BEV_BITS:-W4A8 W4A4 W3A3} --seeds $seed \
        --seconds "$budget" --out "$part" > "$work/bev/${model}_s$seed.log" 2>&1 &
  done
done
wait
nvidia-smi --query-gpu=name,memory.total --format=csv > "$work/gpu.txt" 2>&1
tail -n 3 "$work"/*.log "$work"/bev/*.log > "$OUT/tails.txt" 2>&1
tar -czf "$OUT/evidence.tgz" -C "$work" .
