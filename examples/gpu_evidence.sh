#!/usr/bin/env bash
# Issue 17's evidence in one H200 call: the Fashion-MNIST grid (2 models x 3 bit settings x
# 3 seeds x 19 arms, FP models trained first if no checkpoint exists), its learning curve, and
# the BEV detection grid (4 stand-ins), all sharing the GPU, each resuming from the JSON under
# docs/ and stopping before a cell that would end after SECONDS. Everything comes back as
# $OUT/evidence.tgz; docs/results.md says how each table is made from it.
#
#   OUT=/some/dir SECONDS_BUDGET=500 bash examples/gpu_evidence.sh
#
# FMNIST_WORKERS (5; 0 skips Fashion-MNIST), FMNIST_MODELS ("resnet vit"), FMNIST_CURVE (1; 0 skips
# the learning curve), BEV_MODELS ("bevdet bevdepth4d bevformer sparsebev"),
# DENSE_TASKS ("bevdet_seg bevformer_seg bevdepth4d_occ"), BEV_SEEDS ("0 1 2") and BEV_BITS
# ("W4A8 W4A4") choose how the call's time is shared; BEV_MODELS="" or DENSE_TASKS="" skips those.
# The BEV grids run the 13 core arms (examples/experiment.py ARM_SETS), and W4A8 and W4A4 only:
# the harder setting is for a model whose W4A4 PTQ loses less than 2 points (docs/results.md).
# GPU utilisation is sampled every second into gpu_util.txt (is the shared GPU the bottleneck?).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
budget=${SECONDS_BUDGET:-500}
work=$(mktemp -d)
mkdir -p "$work/fmnist" "$work/curve" "$work/bev" "$work/dense"
nvidia-smi dmon -s u -d 1 > "$work/gpu_util.txt" 2>&1 &
sampler=$!
# Fashion-MNIST grid: the parent trains the FP checkpoints, then the workers share the (bits, seed) groups.
if [ "${FMNIST_WORKERS:-5}" != 0 ]; then
OUT=$work/fmnist python3 -m examples.fashion_mnist.gpu_run --seconds "$budget" --workers "${FMNIST_WORKERS:-5}" \
    --models ${FMNIST_MODELS:-resnet vit} \
    > "$work/fmnist.log" 2>&1 &
# The learning curve needs the CNN's checkpoint: wait for the grid's parent to write it.
start=$(date +%s)
[ "${FMNIST_CURVE:-1}" != 0 ] && (
  [ -f docs/results_fmnist_curve.json ] && cp docs/results_fmnist_curve.json "$work/curve/curve.json"
  ckpt=examples/checkpoints/fmnist_resnet.pt
  [ -f $ckpt ] || { until [ -f "$work/fmnist/fmnist_resnet.pt" ]; do sleep 5; done; sleep 5;
                    cp "$work/fmnist/fmnist_resnet.pt" "$work/curve/"; }
  OUT=$work/curve python3 -m examples.fashion_mnist.gpu_run --curve --models resnet --bits W3A3 \
      --seconds $((budget - $(date +%s) + start)) > "$work/curve.log" 2>&1
) &
fi
# BEV detection, then the dense variants (map segmentation, occupancy): one process per
# (task, seed), each through the bit settings in order, so that the first bit setting gets all
# three seeds before the next one starts; each resumes from its docs/ JSON.
bev_grid() {  # bev_grid <part folder> <results JSON> <task names...>
  local folder=$1 results=$2; shift 2
  for name in "$@"; do
    for seed in ${BEV_SEEDS:-0 1 2}; do
      part=$work/$folder/${name}_s$seed.json
      [ -f "$results" ] && cp "$results" "$part"
      python3 -m examples.experiment run --task bev-$name --bits ${BEV_BITS:-W4A8 W4A4} --seeds $seed --arm-set core \
          --seconds "$budget" --out "$part" > "$work/$folder/${name}_s$seed.log" 2>&1 &
    done
  done
}
bev_grid bev docs/results_bev.json ${BEV_MODELS-bevdet bevdepth4d bevformer sparsebev}
bev_grid dense docs/results_dense.json ${DENSE_TASKS-bevdet_seg bevformer_seg bevdepth4d_occ}
wait $(jobs -p | grep -v "^$sampler$")
kill $sampler
nvidia-smi --query-gpu=name,memory.total --format=csv > "$work/gpu.txt" 2>&1
tail -n 3 "$work"/*.log "$work"/bev/*.log "$work"/dense/*.log > "$OUT/tails.txt" 2>&1
tar -czf "$OUT/evidence.tgz" -C "$work" .
