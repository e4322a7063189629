"""What ``quantize()`` launches and reads back, stage by stage: counts that do not depend on the
machine's load, and that carry over to a GPU, where every op is a kernel launch of a few
microseconds of host time and every read-back waits for the stream.

Per stage (``bench/quantize_cost.STAGES``), from ``torch.profiler`` on the CPU: ``ops`` the
top-level aten ops (each one kernel or more on a GPU), ``reads`` the ``aten::_local_scalar_dense``
calls (``.item()``, ``float(t)``, ``bool(t)``; ``tolist`` reads are not among them: the deferred
histograms read one list per batch, the analysis one at its end), ``syncing`` the
``aten::nonzero`` and ``aten::bincount`` calls (on CUDA each waits for the device to learn its
output size). ResNet-50 and ViT-B/16 at 2 images, 2 calibration batches, W4A8.
``--as-on-cuda`` calibrates as on a GPU (histograms binned after each forward).

    PYTHONPATH=. python bench/quantize_ops.py --as-on-cuda --out bench/quantize_ops.json
"""
from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import ptqat_fx
import ptqat_fx.api as api
from bench.quantize_cost import STAGES
from ptqat_fx.passes import calibrate as calibrate_module
from ptqat_fx.runtime.observer import DeferredHistograms
from tests.zoo.torchvision_zoo import load_torchvision


def _stage(event) -> str:
    while event is not None and not event.name.startswith("stage:"):
        event = event.cpu_parent
    return event.name[len("stage:"):] if event is not None else "-"


def _top_level(event) -> bool:
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith(("stage:", "aten::")):
        parent = parent.cpu_parent
    return parent is None or parent.name.startswith("stage:")


def counts(model: torch.nn.Module, observer: str) -> dict[str, dict[str, int]]:
    batches = [torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    config = ptqat_fx.QuantConfig(w_bits=4, a_bits=8, w_observer=observer, a_observer=observer)
    originals = {}

    def labelled(stage, function):
        def wrapper(*args, **kwargs):
            with record_function(f"stage:{stage}"):
                return function(*args, **kwargs)
        return wrapper

    for stage, names in STAGES.items():
        for name in names:
            originals[name] = getattr(api, name)
            setattr(api, name, labelled(stage, originals[name]))
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ptqat_fx.quantize(model, (batches[0],), batches, config, ptqat_fx.Select("small", fraction=0.5), progress=False)
    finally:
        for name, function in originals.items():
            setattr(api, name, function)
    table: dict[str, dict[str, int]] = {}
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        row = table.setdefault(_stage(event), {"ops": 0, "reads": 0, "syncing": 0})
        row["ops"] += _top_level(event)
        row["reads"] += event.name == "aten::_local_scalar_dense"
        row["syncing"] += event.name in ("aten::nonzero", "aten::bincount")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--observers", nargs="*", default=["mse", "minmax"])
    parser.add_argument("--as-on-cuda", action="store_true")
    parser.add_argument("--out", default="bench/quantize_ops.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.as_on_cuda and hasattr(calibrate_module, "_deferred_histograms"):
        calibrate_module._deferred_histograms = lambda device: DeferredHistograms(1 << 32)
    torchvision = load_torchvision()
    results = {}
    for name in ("resnet50", "vit_b_16"):
        for observer in args.observers:
            torch.manual_seed(0)
            results[f"{name}/{observer}"] = counts(getattr(torchvision.models, name)().eval(), observer)
            print(name, observer, json.dumps(results[f"{name}/{observer}"]), flush=True)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
