"""Which layers to fine-tune: PTQAT's small-discrepancy half against its alternatives.

    python -m examples.bev.ablation [--steps 60] [--scenes 200] [--bits 4]

TinyBEVDet from its committed checkpoint, quantized once (W``bits``A8, calibration and analysis
on 4 training scenes); then, from that same PTQ state, every arm fine-tunes by distillation from
the FP model with the same data, steps and learning rate, and all are evaluated on the same
held-out scenes: PTQ (nothing trained), PTQAT (``small``, half of the layers), its mirror
(``large``), a seeded ``random`` half, and full QAT (``all``). Prints a table and the trainable
parameter counts; numbers in docs/experiments.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import ptqat_fx
from examples.bev import bevdet, scenes, train
from examples.quickstart import BATCH, CHECKPOINT, TRAIN_SEED, collate, evaluate, scene_batches
from ptqat_fx.passes.discrepancy import discrepancy
from ptqat_fx.passes.freeze import freeze
from ptqat_fx.passes.select import select_layers

ARMS = {
    "PTQ (none)": None,
    "PTQAT (small 0.5)": ptqat_fx.Select("small", fraction=0.5),
    "large 0.5": ptqat_fx.Select("large", fraction=0.5),
    "random 0.5": ptqat_fx.Select("random", fraction=0.5, seed=0),
    "full QAT (all)": ptqat_fx.Select("all"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="distillation steps per arm (batch 2)")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--bits", type=int, default=4, help="weight bits (activations 8)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    wall = time.perf_counter()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    val_stream = iter(scene_batches(train.VAL_SEED, args.scenes, BATCH))
    model = train.build("bevdet", CHECKPOINT).eval()
    calib = [bevdet.inputs(collate([scenes.make_sample(TRAIN_SEED + i, frames=1) for i in (first, first + 1)]))
             for first in (0, 2)]
    # Calibrated and analysed once; every arm selects and freezes its own copy.
    analysed = ptqat_fx.quantize(model, calib[0], calib, ptqat_fx.QuantConfig(w_bits=args.bits, a_bits=8),
                                 select=None, progress=False)
    discrepancy(analysed, calib, len(calib[0]), progress=False)
    train_data = [bevdet.inputs(batch) for batch in scene_batches(TRAIN_SEED + 4, 2 * args.steps, 2)]
    models, trainable = {"FP32": model}, {}
    for name, select in ARMS.items():
        arm = freeze(select_layers(copy.deepcopy(analysed), select or ptqat_fx.Select("none")))
        trainable[name] = ptqat_fx.report(arm).trainable_quantizable_params
        if select is not None:
            torch.manual_seed(0)
            ptqat_fx.finetune(arm.train(), train_data, teacher=model, steps=args.steps, progress=False)
        models[name] = arm
        print(f"{name}: ready at {time.perf_counter() - wall:.0f} s", flush=True)
    results = evaluate(models, val_stream, model.decode)
    print(f"\nTinyBEVDet W{args.bits}A8, {args.steps} distillation steps per arm, {args.scenes} held-out scenes")
    print(f"{'arm':<20} {'mAP':>6} {'NDS_like':>9} {'trainable layer params':>23}")
    for name, metrics in results.items():
        print(f"{name:<20} {metrics['mAP']:6.3f} {metrics['NDS_like']:9.3f} {trainable.get(name, 0):>23,}")
    print(f"total {time.perf_counter() - wall:.0f} s")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"args": vars(args), "results": results, "trainable": trainable}, handle, indent=2)


if __name__ == "__main__":
    main()
