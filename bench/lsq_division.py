"""Why compiled LSQ step-size gradients left eager's on CUDA, and which compiled form keeps them.

A min-max step puts each channel's largest weight exactly on the clip bound: ``max|w| / s`` is
``qmax`` in IEEE division. Inductor's CUDA code divides approximately (``div.full.f32``; eager
and the Triton kernels use ``div_rn``), so the compiled quotient can come out one ulp above
``qmax``: the element counts as clipped, its weight gradient becomes 0 and its step-gradient
term jumps from ``round(v) - v = 0`` to ``qmax``. One such element per channel moves a step
gradient by tens of percent (issue 15: ResNet ``layers.2.conv1.weight_fake_quant.scale``, 0.27).

This compares, for per-channel min-max weights and a per-tensor activation, eager LSQ with
``torch.compile`` of the differentiable tensor ops (``lsq_fake_quantize_ops``) and of the
``torch.library`` custom op (``lsq_kernels.lsq_fake_quantize``, the Triton kernels on CUDA):
elements whose clip mask differs from eager's, and the step gradient's relative difference;
and, to show the mechanism on any device, eager with a step one ulp smaller.

    PYTHONPATH=. python3 bench/lsq_division.py --device cuda --out $OUT/lsq_division.json
    PYTHONPATH=. python3 bench/lsq_division.py --device cpu --smoke
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch

from ptqat_fx.runtime import lsq_kernels
from ptqat_fx.runtime.quantizer import lsq_fake_quantize, lsq_fake_quantize_ops


def _case(kind: str, smoke: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int, int, int | None]:
    """``(x, step, qmin, qmax, channel_axis)``: min-max steps, as calibration sets them."""
    generator = torch.Generator().manual_seed(0)
    if kind == "weight W4 per channel":
        x = torch.randn((64, 32, 3, 3) if smoke else (512, 256, 3, 3), generator=generator) * 0.05
        step = x.abs().amax((1, 2, 3)) / 7
        return x.to(device), step.to(device), -8, 7, 0
    x = torch.randn((8, 64, 14, 14) if smoke else (64, 256, 28, 28), generator=generator).relu()
    return x.to(device), (x.max() / 255).reshape(1).to(device), 0, 255, None


def _gradients(fn: Callable, x: torch.Tensor, step: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    x, step = x.clone().requires_grad_(), step.clone().requires_grad_()
    out = fn(x, step)
    out.backward(grad)
    return [out.detach(), x.grad, step.grad]


def compare(kind: str, smoke: bool, device: torch.device) -> dict:
    """Mask and step-gradient differences of each compiled form from eager, for one case."""
    x, step, qmin, qmax, axis = _case(kind, smoke, device)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device)
    forms = {
        "eager": lambda a, s: lsq_fake_quantize(a, s, qmin, qmax, axis),
        "compiled tensor ops": torch.compile(lambda a, s: lsq_fake_quantize_ops(a, s, qmin, qmax, axis), fullgraph=True),
        "compiled custom op": torch.compile(
            lambda a, s: lsq_kernels.lsq_fake_quantize(a, s, qmin, qmax, axis), fullgraph=True),
        # The mechanism on any device: a step one ulp smaller makes each quotient about one ulp
        # larger, as an approximate division may; the step gradient still flows through.
        "eager, step 1 ulp smaller": lambda a, s: lsq_fake_quantize(
            a, s + (torch.nextafter(s.detach(), torch.zeros_like(s)) - s.detach()), qmin, qmax, axis),
    }
    torch._dynamo.reset()
    eager_out, eager_gx, eager_gs = _gradients(forms.pop("eager"), x, step, grad)
    row = {"elements": x.numel(), "steps": step.numel(), "kernels": lsq_kernels.applies(x)}
    for name, fn in forms.items():
        out, gx, gs = _gradients(fn, x, step, grad)
        row[name] = {
            "output_mismatches": int((out != eager_out).sum()),
            # The input gradient is the output gradient where the mask says inside, else 0.
            "mask_mismatches": int(((gx == 0) != (eager_gx == 0)).sum()),
            "step_grad_rel_diff": float((gs - eager_gs).norm() / eager_gs.norm()),
        }
        torch._dynamo.reset()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="small tensors: a CPU check that it runs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "cases": {}}
    for kind in ("weight W4 per channel", "activation A8 per tensor"):
        results["cases"][kind] = compare(kind, args.smoke, device)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    print(f"device: {results['device']}, torch {results['torch']}")
    print("| case | form | output mismatches | mask mismatches | step grad rel diff |")
    print("|---|---|---|---|---|")
    for kind, row in results["cases"].items():
        for name in ("compiled tensor ops", "compiled custom op", "eager, step 1 ulp smaller"):
            r = row[name]
            print(f"| {kind} | {name} | {r['output_mismatches']} | {r['mask_mismatches']} "
                  f"| {r['step_grad_rel_diff']:.2e} |")


if __name__ == "__main__":
    main()
