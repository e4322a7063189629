"""What ``quantize()`` costs, stage by stage, as a ratio to float forwards over its calibration set.

Stages: ``copy`` (the working deep copy, attention unfused), ``check`` (one eager forward of the
example inputs), ``trace``, ``insert`` (BN folding, annotation and quantizer insertion),
``calibrate`` (which also keeps the float layer outputs), ``analyse`` (the discrepancy
analysis: the quantized side only, against calibration's float outputs), ``select``,
``freeze``; ``total`` is all of ``quantize()``. Each stage's time (wall clock, the device synchronised around it) is divided by the
time of plain float forwards of the same model over the same calibration batches, measured in
the same process (``torch.no_grad``, after a warm-up forward). Models: CPU a 19.6M-parameter MLP
(2304-3072-3072-1000), ResNet-50 and ViT-B/16 at a small batch; GPU ResNet-50 and ViT-B/16 at
batch 32 with 8 calibration batches. Also the weight MSE clip search: the observer's sequential
loop (the former code, kept in tests/runtime/test_mse_search.py) against ``ptqat_fx.runtime.mse_search.mse_channel_clip`` on the same weights.

    PYTHONPATH=. python bench/quantize_cost.py --device cpu --quick --threads 1 --out bench/quantize_cost_cpu.json
    PYTHONPATH=. python bench/quantize_cost.py --device cuda --out $OUT/quantize_cost_gpu.json
    PYTHONPATH=. python bench/quantize_cost.py --device cpu --smoke --out /tmp/quantize_cost_smoke.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import ptqat_fx
import ptqat_fx.api as api
from examples.mlp import MLP
from ptqat_fx.runtime.observer import RangeObserver
from ptqat_fx.runtime.mse_search import mse_channel_clip
from tests.runtime.test_mse_search import sequential_mse_clip
from tests.zoo.torchvision_zoo import load_torchvision

# Stage -> the functions ptqat_fx.api calls for it, in order.
STAGES = {
    "copy": ("unfused_copy",),
    "check": ("_check_example_inputs",),
    "trace": ("trace",),
    "insert": ("fold_bn", "annotate", "insert_quantizers", "quantize_leaves", "quantize_joins"),
    "calibrate": ("calibrate",),
    "analyse": ("discrepancy",),
    "select": ("select_layers",),
    "freeze": ("freeze",),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def stage_timers(device: torch.device):
    """Wrap the functions ``ptqat_fx.api.quantize`` calls so each stage's time is recorded;
    the library is untouched outside the ``with`` block."""
    times = {stage: 0.0 for stage in STAGES}
    originals = {}

    def timed(stage: str, function: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            _sync(device)
            start = time.perf_counter()
            result = function(*args, **kwargs)
            _sync(device)
            times[stage] += time.perf_counter() - start
            return result
        return wrapper

    for stage, names in STAGES.items():
        for name in names:
            originals[name] = getattr(api, name)
            setattr(api, name, timed(stage, originals[name]))
    try:
        yield times
    finally:
        for name, function in originals.items():
            setattr(api, name, function)


def build_models(device: torch.device, quick: bool, smoke: bool) -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]]:
    """Name -> (constructor, input shape, calibration batches)."""
    torchvision = load_torchvision()
    if smoke:  # the GPU run's models and code path, at a size any CPU runs in a minute
        return {"ResNet-50": (torchvision.models.resnet50, (2, 3, 224, 224), 2),
                "ViT-B/16": (torchvision.models.vit_b_16, (2, 3, 224, 224), 2)}
    if device.type == "cuda":
        return {"ResNet-50": (torchvision.models.resnet50, (32, 3, 224, 224), 8),
                "ViT-B/16": (torchvision.models.vit_b_16, (32, 3, 224, 224), 8)}
    image_batch, batches = (2, 2) if quick else (8, 4)
    return {"MLP-20M": (lambda: MLP(2304, 3072, 1000), (64, 2304), 8 if quick else 16),
            "ResNet-50": (torchvision.models.resnet50, (image_batch, 3, 224, 224), batches),
            "ViT-B/16": (torchvision.models.vit_b_16, (image_batch, 3, 224, 224), batches)}


def float_forwards(model: nn.Module, batches: list[torch.Tensor], device: torch.device) -> float:
    """Seconds for float forwards over ``batches``, after one warm-up forward."""
    with torch.no_grad():
        model(batches[0])
        _sync(device)
        start = time.perf_counter()
        for batch in batches:
            model(batch)
        _sync(device)
    return time.perf_counter() - start


def mse_search_ratio(model: nn.Module, device: torch.device, max_elements: int, qmax: int = 7) -> dict:
    """The observer's sequential MSE search against the vectorised one on the model's largest
    conv/linear weights (up to ``max_elements`` in all), checking they pick the same clips."""
    weights = sorted((m.weight.detach() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))),
                     key=lambda w: -w.numel())
    chosen, total = [], 0
    for weight in weights:
        if total + weight.numel() <= max_elements or not chosen:
            chosen.append(weight)
            total += weight.numel()
    timings = {"sequential_s": 0.0, "vectorised_s": 0.0}
    equal = True
    for weight in chosen:
        observer = RangeObserver("mse", qmax, 0)
        observer.update(weight)
        _sync(device)
        start = time.perf_counter()
        sequential = sequential_mse_clip(observer.latest, observer.abs_max, qmax)
        _sync(device)
        timings["sequential_s"] += time.perf_counter() - start
        start = time.perf_counter()
        vectorised = mse_channel_clip(observer.latest, observer.abs_max, qmax)
        _sync(device)
        timings["vectorised_s"] += time.perf_counter() - start
        equal = equal and torch.equal(sequential, vectorised)
    return {**timings, "ratio": timings["sequential_s"] / max(timings["vectorised_s"], 1e-12),
            "weights": len(chosen), "elements": total, "same_clips": equal}


def measure(name: str, build: Callable[[], nn.Module], shape: tuple[int, ...], n_batches: int, device: torch.device,
            observer: str, mse_elements: int, warm: bool = False) -> dict:
    torch.manual_seed(0)
    model = build().to(device).eval()
    generator = torch.Generator(device=device).manual_seed(1)
    batches = [torch.randn(shape, generator=generator, device=device) for _ in range(n_batches)]
    forwards = float_forwards(model, batches, device)
    config = ptqat_fx.QuantConfig(w_bits=4, a_bits=8, w_observer=observer, a_observer=observer)
    if warm:  # once untimed: what a process pays only on its first call (kernel loading, JIT) is left out
        ptqat_fx.quantize(model, (batches[0],), batches, config, ptqat_fx.Select("small", fraction=0.5), progress=False)
    with stage_timers(device) as times:
        _sync(device)
        start = time.perf_counter()
        ptqat_fx.quantize(model, (batches[0],), batches, config, ptqat_fx.Select("small", fraction=0.5), progress=False)
        _sync(device)
        total = time.perf_counter() - start
    row = {"float_forwards_s": forwards, "total_s": total, "total_x_forwards": total / forwards,
           "stages_s": dict(times), "stages_x_forwards": {k: v / forwards for k, v in times.items()},
           "trace_plus_insert_s": times["trace"] + times["insert"],
           "check_trace_insert_s": times["check"] + times["trace"] + times["insert"],
           "batch": shape[0], "calib_batches": n_batches, "warm": warm}
    if observer == "mse" and mse_elements:
        row["mse_search"] = mse_search_ratio(model, device, mse_elements)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="CPU: smaller image batches")
    parser.add_argument("--smoke", action="store_true", help="the GPU models at batch 2, 2 batches, no MSE comparison")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (on a shared machine 1 thread is steadier than 2 that contend)")
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--observers", nargs="*", default=["mse", "minmax"])
    parser.add_argument("--mse-elements", type=int, default=None,
                        help="weight elements for the MSE search comparison (default: 3M CPU, 30M GPU)")
    parser.add_argument("--warm", action="store_true",
                        help="run each quantize() once untimed first (without: the first model pays one-time costs, "
                             "on CUDA the loading of kernels and the Triton compilation of the first fake-quant kernel)")
    parser.add_argument("--out", default="bench/quantize_cost.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    mse_elements = args.mse_elements if args.mse_elements is not None else (3_000_000 if device.type == "cpu" else 30_000_000)
    if args.smoke:
        mse_elements = 0
    models = build_models(device, args.quick, args.smoke)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "threads": torch.get_num_threads(), "load_avg_1min_at_start": load,
               "command": " ".join(sys.argv),
               "models": {}}
    for name in args.models or list(models):
        build, shape, n_batches = models[name]
        for observer in args.observers:
            try:
                row = measure(name, build, shape, n_batches, device, observer, mse_elements, args.warm)
            except Exception as error:  # a failing model is a result too
                row = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
            results["models"].setdefault(name, {})[observer] = row
            print(f"{name:10} {observer:7} {json.dumps(row)}", flush=True)
            with open(args.out, "w") as handle:
                json.dump(results, handle, indent=2)
    results["load_avg_1min_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2)
    print_table(results)


def print_table(results: dict) -> None:
    print(f"\ndevice: {results['device']}, torch {results['torch']}, {results['threads']} threads, load "
          f"{results['load_avg_1min_at_start']:.1f} at the start, {results['load_avg_1min_at_end']:.1f} at the end")
    print("| model | observer | FP fwd s | total x FP fwd | " + " | ".join(STAGES)
          + " | trace+insert s | check+trace+insert s | MSE loop/vectorised |")
    print("|---|---|---|---|" + "---|" * len(STAGES) + "---|---|---|")
    for name, rows in results["models"].items():
        for observer, row in rows.items():
            if "error" in row:
                print(f"| {name} | {observer} | {row['error']} |")
                continue
            stages = " | ".join(f"{row['stages_x_forwards'][s]:.2f}" for s in STAGES)
            mse = row.get("mse_search")
            mse_text = f"{mse['ratio']:.1f}x (same: {mse['same_clips']})" if mse else ""
            print(f"| {name} | {observer} | {row['float_forwards_s']:.2f} | {row['total_x_forwards']:.2f} | {stages} | "
                  f"{row['trace_plus_insert_s']:.2f} | {row['check_trace_insert_s']:.2f} | {mse_text} |")


if __name__ == "__main__":
    main()
