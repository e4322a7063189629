"""Cost of the discrepancy analysis relative to one FP forward over the same data.

Target (issue 3): analysing all layers costs <= 3x one FP forward over the calibration data.
Measured as ``quantize`` runs it: one metric (``relative``), per mode.
Both are timed in the same process in alternating rounds (float forward, then analysis); the
figure is the median over rounds of analysis time / float time, so load that comes and goes
moves both sides of a ratio alike. Prints a table and writes JSON.

    PYTHONPATH=. python bench/discrepancy_cost.py [--device cuda] [--threads 1] [--out bench/discrepancy_cost.json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import ptqat_fx
from ptqat_fx.passes.discrepancy import discrepancy
from examples import resnet_small, vit_small

MODELS = {
    "resnet(w32,b2) 64x3x32x32": (lambda: resnet_small.build(width=32, blocks=2), (64, 3, 32, 32)),
    "vit(d128,L4) 64x3x32x32": (
        lambda: vit_small.build(image=32, patch=4, in_channels=3, dim=128, depth=4, heads=4),
        (64, 3, 32, 32),
    ),
}


def _seconds(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _median_ratio(analysis, baseline, device: str, rounds: int) -> float:
    analysis(), baseline()  # warm-up
    ratios = sorted(_seconds(analysis, device) / _seconds(baseline, device) for _ in range(rounds))
    return ratios[len(ratios) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default="bench/discrepancy_cost.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name, (build, shape) in MODELS.items():
        model = build().to(args.device)
        generator = torch.Generator().manual_seed(0)
        data = [torch.randn(shape, generator=generator).to(args.device) for _ in range(args.batches)]
        qmodel = ptqat_fx.quantize(model, (data[0],), data, progress=False)

        def float_forward():
            with torch.no_grad():
                for x in data:
                    model(x)

        row = {"model": name, "device": str(torch.cuda.get_device_name()) if args.device == "cuda" else "cpu"}
        for modes in (("accumulated",), ("local",), ("accumulated", "local")):
            row["+".join(modes)] = _median_ratio(
                lambda: discrepancy(qmodel, data, 1, modes=modes, metrics=("relative",), progress=False), float_forward, args.device, args.rounds
            )
        rows.append(row)
    with open(args.out, "w") as handle:
        json.dump(rows, handle, indent=2)
    print(f"{'model':32} {'device':14} {'accumulated':>12} {'local':>8} {'both':>8}   (x one FP forward)")
    for row in rows:
        print(f"{row['model']:32} {row['device']:14} {row['accumulated']:12.2f} {row['local']:8.2f} {row['accumulated+local']:8.2f}")


if __name__ == "__main__":
    main()
