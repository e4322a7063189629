"""Quickstart: quantize TinyBEVDet at W4A8 with PTQAT and compare its mAP with full precision.

    python -m examples.quickstart [--scenes 200] [--finetune-steps 20]

Loads the committed checkpoint (``examples/checkpoints/bevdet.pt``), quantizes it with PTQAT
(W4A8; calibration and discrepancy analysis on a few training scenes; the half of the layers
with the smallest discrepancy left trainable), prints the report, distils a copy's trainable
layers from the FP model for ``--finetune-steps`` steps on training scenes, and evaluates FP,
W4A8 PTQ and W4A8 PTQAT on held-out synthetic scenes. Scenes (current frame only: BEVDet is
single-frame) are rendered by one DataLoader worker while the main process quantizes,
fine-tunes and evaluates; both run one thread, which suits a 2-core CPU. No download; numbers
and timings in docs/models.md.
"""
from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

import ptqat_fx
from examples.bev import bevdet, metric, scenes, train

CHECKPOINT = "examples/checkpoints/bevdet.pt"
TRAIN_SEED = 0   # calibration and fine-tuning scenes; evaluation uses the held-out ones from train.VAL_SEED
BATCH = 8


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A batch without the per-pixel depth and instance maps BEVDet does not use."""
    return torch.utils.data.default_collate([{k: v for k, v in s.items() if k not in ("depth", "instances")} for s in samples])


def scene_batches(seed: int, count: int, batch: int) -> torch.utils.data.DataLoader:
    """Batches of scenes ``seed .. seed + count - 1``, all rendered ahead by one worker process."""
    batches = -(-count // batch)
    return torch.utils.data.DataLoader(
        scenes.SceneDataset(seed, count, frames=1), batch_size=batch, collate_fn=collate,
        num_workers=1, prefetch_factor=batches,
    )


@torch.no_grad()
def evaluate(models: dict[str, nn.Module], batches: Iterable[dict[str, torch.Tensor]],
             decode: Callable[[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]) -> dict[str, dict[str, float]]:
    """Metrics of every model on the same stream of batches (each batch rendered once)."""
    predictions: dict[str, list] = {name: [] for name in models}
    targets: list[dict[str, torch.Tensor]] = []
    for batch in batches:
        for name, model in models.items():
            predictions[name] += decode(model.eval()(*bevdet.inputs(batch)))
        targets += metric.ground_truth(batch)
    return {name: metric.evaluate(found, targets) for name, found in predictions.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=200, help="held-out scenes to evaluate on")
    parser.add_argument("--calib-scenes", type=int, default=4, help="training scenes for calibration and analysis")
    parser.add_argument("--finetune-steps", type=int, default=20, help="distillation steps after PTQ (batch 2); 0: PTQ only")
    args = parser.parse_args()
    wall, cpu = time.perf_counter(), time.process_time()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    val = scene_batches(train.VAL_SEED, args.scenes, BATCH)
    val_stream = iter(val)   # the worker starts rendering now
    model = train.build("bevdet", CHECKPOINT).eval()
    calib = [bevdet.inputs(collate([scenes.make_sample(TRAIN_SEED + i, frames=1) for i in range(first, first + 2)]))
             for first in range(0, args.calib_scenes, 2)]
    qmodel = ptqat_fx.quantize(
        model, calib[0], calib, ptqat_fx.QuantConfig(w_bits=4, a_bits=8),
        ptqat_fx.Select("small", fraction=0.5), progress=False,
    )
    print(ptqat_fx.report(qmodel), flush=True)
    print(f"quantized in {time.perf_counter() - wall:.0f} s", flush=True)

    models = {"FP32": model, "W4A8 PTQ": qmodel}
    if args.finetune_steps:
        tuned = copy.deepcopy(qmodel)
        train_data = [bevdet.inputs(batch) for batch in scene_batches(TRAIN_SEED + args.calib_scenes, 2 * args.finetune_steps, 2)]
        history = ptqat_fx.finetune(tuned.train(), train_data, teacher=model, steps=args.finetune_steps, progress=False)
        models[f"W4A8 PTQAT ({history.steps} steps)"] = tuned
        print(f"fine-tuned by {time.perf_counter() - wall:.0f} s", flush=True)
    results = evaluate(models, val_stream, model.decode)

    print(f"\nTinyBEVDet on {args.scenes} held-out scenes")
    print(f"{'model':<24} {'mAP':>6} {'NDS_like':>9}")
    for name, metrics in results.items():
        print(f"{name:<24} {metrics['mAP']:6.3f} {metrics['NDS_like']:9.3f}")
    print(f"total {time.perf_counter() - wall:.0f} s wall, main process {time.process_time() - cpu:.0f} s CPU")


if __name__ == "__main__":
    main()
