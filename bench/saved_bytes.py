"""Bytes kept for backward in one training step, as a ratio to FP32 training of the model.

Deterministic (autograd's saved tensors, each storage once), so it runs on CPU. Arms: FP32
training; torch.ao FX LSQ QAT (the baseline); our full QAT (Select("all")); PTQAT with half
of the layers trainable (Select("small")); pure PTQ (Select("none")). W4A8.

    PYTHONPATH=. python bench/saved_bytes.py [--out bench/saved_bytes.json]
"""
from __future__ import annotations

import argparse
import copy
import json

import torch

import ptqat_fx
from ptqat_fx.saved_tensors import saved_tensor_bytes
from examples import resnet_small, vit_small
from bench.torch_ao_lsq import prepare_torch_ao_lsq

MODELS = {
    "resnet_small (w16, 32x32)": (resnet_small.build, (32, 3, 32, 32)),
    "resnet_small (w32 b2, 32x32)": (lambda: resnet_small.build(width=32, blocks=2), (32, 3, 32, 32)),
    "vit_small (d32 L2, 28x28)": (vit_small.build, (32, 1, 28, 28)),
    "vit_small (d128 L4, 32x32)": (
        lambda: vit_small.build(image=32, patch=4, in_channels=3, dim=128, depth=4, heads=4), (32, 3, 32, 32)
    ),
}


def _step_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    return saved_tensor_bytes(lambda: model(x).square().mean())


def measure(build, shape) -> dict[str, float | str]:
    generator = torch.Generator().manual_seed(0)
    data = [torch.randn(shape, generator=generator) for _ in range(4)]
    model = build().train()
    float_bytes = _step_bytes(model, data[0])
    row: dict[str, float | str] = {"fp32_bytes": float_bytes}
    try:
        row["torch.ao LSQ QAT"] = _step_bytes(prepare_torch_ao_lsq(copy.deepcopy(model), (data[0],)), data[0]) / float_bytes
    except Exception as error:  # the baseline fails on some models; that is a result too
        row["torch.ao LSQ QAT"] = f"fails: {type(error).__name__}"
    for label, strategy in (("ours full QAT", "all"), ("PTQAT small 0.5", "small"), ("PTQ only", "none")):
        qmodel = ptqat_fx.quantize(model, (data[0],), data, select=ptqat_fx.Select(strategy), progress=False).train()
        row[label] = _step_bytes(qmodel, data[0]) / float_bytes
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/saved_bytes.json")
    args = parser.parse_args()
    results = {name: measure(build, shape) for name, (build, shape) in MODELS.items()}
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2)
    columns = ["torch.ao LSQ QAT", "ours full QAT", "PTQAT small 0.5", "PTQ only"]
    print(f"{'model':30} {'FP32 MB':>8} " + " ".join(f"{c:>17}" for c in columns) + "   (x FP32 training)")
    for name, row in results.items():
        cells = [f"{row[c]:17.2f}" if isinstance(row[c], float) else f"{row[c]:>17}" for c in columns]
        print(f"{name:30} {row['fp32_bytes'] / 2**20:8.1f} " + " ".join(cells))


if __name__ == "__main__":
    main()
