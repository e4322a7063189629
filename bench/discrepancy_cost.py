"""Cost of the discrepancy analysis relative to one FP forward over the same data.

Target (issue 3): analysing all layers costs <= 3x one FP forward over the calibration data.
Both are timed in the same process, interleaved, best of several repeats. Prints a table and
writes JSON.

    PYTHONPATH=. python bench/discrepancy_cost.py [--device cuda] [--out bench/discrepancy_cost.json]
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


def _best_time(fn, device: str, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/discrepancy_cost.json")
    args = parser.parse_args()
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

        row = {"model": name, "device": args.device}
        float_time = _best_time(float_forward, args.device, args.repeats)
        for modes in (("accumulated",), ("local",), ("accumulated", "local")):
            analysis = _best_time(lambda: discrepancy(qmodel, data, 1, modes=modes, progress=False), args.device, args.repeats)
            row["+".join(modes)] = analysis / float_time
        rows.append(row)
    with open(args.out, "w") as handle:
        json.dump(rows, handle, indent=2)
    print(f"{'model':32} {'device':6} {'accumulated':>12} {'local':>8} {'both':>8}   (x one FP forward)")
    for row in rows:
        print(f"{row['model']:32} {row['device']:6} {row['accumulated']:12.2f} {row['local']:8.2f} {row['accumulated+local']:8.2f}")


if __name__ == "__main__":
    main()
