"""Quickstart: quantize TinyBEVDet at W4A8 with PTQAT and watch fine-tuning recover what PTQ lost.

    python -m examples.quickstart [--scenes 48] [--finetune-steps 10] [--html quickstart_report.html]

Four stages, each with a heading, a progress bar (on a terminal) and its elapsed time: (1)
quantize the committed checkpoint (``examples/checkpoints/bevdet.pt``) with PTQAT: calibration
and discrepancy analysis on 4 training scenes, the half of the layers with the smallest
discrepancy left trainable, the report printed; (2) distil a copy's trainable layers from the
FP model for ``--finetune-steps`` steps on further training scenes; (3) evaluate FP, W4A8 PTQ
and W4A8 PTQAT on the same held-out synthetic scenes; (4) write the HTML report. Then the table
and what to try next. Scenes (current frame only: BEVDet is single-frame) are rendered by
DataLoader workers while the main process quantizes, fine-tunes and evaluates on one thread,
which suits a 2-core CPU; the defaults finish in well under a minute there. Deterministic under
its seeds; no download. Numbers and timings in docs/models.md.
"""
from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import ptqat_fx
from examples.bev import bevdet, metric, scenes, train

CHECKPOINT = str(Path(__file__).parent / "checkpoints" / "bevdet.pt")  # from any working directory
TRAIN_SEED = 0   # calibration and fine-tuning scenes; evaluation uses the held-out ones from train.VAL_SEED
BATCH = 8
SCENES, STEPS = 48, 10   # sized to finish in under a minute on 2 CPU cores


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


def stage(number: int, heading: str) -> Callable[[], None]:
    """Print a stage's one-line heading now; the returned function prints its elapsed time."""
    print(f"\n[{number}/4] {heading}", flush=True)
    start = time.perf_counter()
    return lambda: print(f"      done in {time.perf_counter() - start:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=SCENES, help=f"held-out scenes to evaluate on (default {SCENES})")
    parser.add_argument("--calib-scenes", type=int, default=4, help="training scenes for calibration and analysis")
    parser.add_argument("--finetune-steps", type=int, default=STEPS, help=f"distillation steps after PTQ (batch 2; default {STEPS}); 0: PTQ only")
    parser.add_argument("--html", default="quickstart_report.html", help="where to write the HTML report")
    args = parser.parse_args()
    wall, cpu = time.perf_counter(), time.process_time()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    val = scene_batches(train.VAL_SEED, args.scenes, BATCH)
    val_stream = iter(val)   # the worker starts rendering now
    # The fine-tuning scenes get a worker of their own, so they too render during quantization.
    train_stream = iter(scene_batches(TRAIN_SEED + args.calib_scenes, 2 * args.finetune_steps, 2)) \
        if args.finetune_steps else None
    model = train.build("bevdet", CHECKPOINT).eval()

    done = stage(1, f"Quantize TinyBEVDet to W4A8: calibrate on {args.calib_scenes} training scenes, measure every "
                    "layer's discrepancy, keep the small-discrepancy half trainable")
    calib = [bevdet.inputs(collate([scenes.make_sample(TRAIN_SEED + i, frames=1) for i in range(first, first + 2)]))
             for first in range(0, args.calib_scenes, 2)]
    qmodel = ptqat_fx.quantize(
        model, calib[0], calib, ptqat_fx.QuantConfig(w_bits=4, a_bits=8),
        ptqat_fx.Select("small", fraction=0.5), progress=True,
    )
    done()
    summary = ptqat_fx.report(qmodel)
    print(summary, flush=True)

    models = {"FP32": model, "W4A8 PTQ": qmodel}
    if args.finetune_steps:
        done = stage(2, f"Fine-tune the trainable half for {args.finetune_steps} steps, distilling from the FP32 model "
                        "(the other half stays frozen in its PTQ state)")
        tuned = copy.deepcopy(qmodel)
        train_data = [bevdet.inputs(batch) for batch in train_stream]
        history = ptqat_fx.finetune(tuned.train(), train_data, teacher=model, steps=args.finetune_steps, progress=True)
        models[f"W4A8 PTQAT ({history.steps} steps)"] = tuned
        done()
    else:
        stage(2, "Fine-tune: skipped (--finetune-steps 0)")

    done = stage(3, f"Evaluate FP32, PTQ and PTQAT on the same {args.scenes} held-out scenes")
    batches = tqdm(val_stream, desc="evaluate", total=len(val), leave=False, disable=None)
    results = evaluate(models, batches, model.decode)
    done()

    done = stage(4, "Write the HTML report (per-layer table, discrepancy plot, layer graph)")
    try:
        html = summary.save_html(args.html, title="ptqat-fx quickstart: TinyBEVDet W4A8")
    except ModuleNotFoundError as error:  # matplotlib is a dev extra
        html = f"not written ({error})"
    done()

    print(f"\nTinyBEVDet on {args.scenes} held-out scenes")
    print(f"{'model':<24} {'mAP':>6} {'NDS_like':>9}")
    for name, metrics in results.items():
        print(f"{name:<24} {metrics['mAP']:6.3f} {metrics['NDS_like']:9.3f}")
    print(f"total {time.perf_counter() - wall:.0f} s wall, main process {time.process_time() - cpu:.0f} s CPU")
    print(
        "\nWhat next:\n"
        f"  open the report:        {html}\n"
        "  run the ablation:       python -m examples.bev.ablation   (PTQAT vs PTQ, full QAT, large, random half)\n"
        "  quantize your own model: ptqat-fx analyze mypackage.models:build --input-shape 8,3,224,224 --html report.html\n"
        "                          or in Python: README.md, section Use (quantize, report, finetune, convert)"
    )


if __name__ == "__main__":
    main()
