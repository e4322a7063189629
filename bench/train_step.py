"""One training step on a GPU, as a ratio to FP32 training of the same model in the same process.

Models: torchvision ResNet-50 and ViT-B/16, random init, batch 64 at 224x224, cross-entropy on
random labels, SGD (momentum 0.9). Arms: FP32; torch.ao FX LSQ W4A8 full QAT (the anchor,
``bench/torch_ao_lsq.py``); our full QAT W4A8 (``Select("all")``); our PTQAT W4A8 with the
small-discrepancy half trainable (``Select("small", fraction=0.5)``); and two floors: ``floor``,
the PTQAT model's structure (BN folded, the same trainable layers) with every quantizer removed,
and ``floor_all``, the same for full QAT. PTQAT/floor and full-QAT/floor_all are the cost of fake
quantization itself. Each arm eager, and for the arms named by ``--compile-arms`` through
``torch.compile``. Calibration and analysis use a few batches of random data: enough for timing,
which does not depend on the scales. torchvision's ViT head is zero-initialised, which makes every
upstream gradient zero; it is drawn from N(0, 0.02) here so the gradient check means something.

Before anything is timed, every arm passes ``bench.grad_check``: one eager and one compiled
backward from the same state; an arm whose trainable tensors get a missing or zero gradient,
or a compiled gradient further from eager than the float arms' own difference allows, is refused
(its row says why) and not timed.

Step time: CUDA events around each step (forward, loss, backward, optimizer step), median of
``--steps`` steps after ``--warmup``. Peak memory: ``max_memory_allocated`` over the timed
steps, the model's weights, gradients and optimizer state included. ``--profile`` prints the
top CUDA ops of a few steps of the named arms. ``--kernels-off-too`` also times each quantized
arm eager with the fused LSQ kernels off (``lsq_kernels.ENABLED``), after checking that the
kernels' gradients are the pure-torch quantizer's.

    PYTHONPATH=. python bench/train_step.py --device cuda --out bench/train_step.json
    PYTHONPATH=. python bench/train_step.py --device cpu --tiny     # a smoke run, no GPU
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import ptqat_fx
from bench.grad_check import GradientCheckError, grad_check, tolerance_from_floor
from bench.torch_ao_lsq import prepare_torch_ao_lsq
from ptqat_fx.meta import float_weight
from ptqat_fx.runtime import lsq_kernels
from tests.zoo.torchvision_zoo import load_torchvision

ARMS = ("fp32", "floor", "floor_all", "torch_ao_lsq", "ours_qat", "ptqat_small_0.5")
FLOAT_ARMS = ("fp32", "floor", "floor_all")
# Relative gradient difference allowed between the kernels and the pure-torch quantizer: both
# compute the same masks and roundings; only the order of the step-gradient sums differs.
KERNEL_TOLERANCE = 1e-3
# The floor each quantized arm is compared with.
FLOOR_OF = {"ptqat_small_0.5": "floor", "ours_qat": "floor_all"}


def _nonzero_head(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def built() -> nn.Module:
        model = build()
        nn.init.normal_(model.heads.head.weight, std=0.02)
        return model
    return built


def build_models(tiny: bool) -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    """Model name -> (constructor, input shape)."""
    torchvision = load_torchvision()
    if tiny:
        vit = lambda: torchvision.models.VisionTransformer(  # noqa: E731
            image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10)
        return {"ResNet-50": (lambda: torchvision.models.resnet50(num_classes=10), (2, 3, 32, 32)),
                "ViT-B/16": (_nonzero_head(vit), (2, 3, 32, 32))}
    return {"ResNet-50": (torchvision.models.resnet50, (64, 3, 224, 224)),
            "ViT-B/16": (_nonzero_head(torchvision.models.vit_b_16), (64, 3, 224, 224))}


def strip_quantizers(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The float floor of a quantized (frozen) model: the same graph, BN folded, frozen layers
    as ``frozen_conv``, the same trainable weights, but every quantizer removed (a frozen layer
    reads its float weight, a fused ``quantized_*`` layer its float form) and no step sizes
    trainable. Rewrites ``gm`` in place."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and type(gm.get_submodule(node.target)).__name__ == "FakeQuantizer":
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.op == "get_attr" and float_weight(node) is not None:
            node.target = float_weight(node)
        elif node.op == "call_function" and hasattr(node.target, "float_reference"):
            node.target = node.target.float_reference
    for name, parameter in gm.named_parameters():
        if name.endswith(".scale"):
            parameter.requires_grad_(False)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm


def make_arm(arm: str, model: nn.Module, shape: tuple[int, ...], device: torch.device, calib_batches: int,
             config: ptqat_fx.QuantConfig) -> nn.Module:
    """The training model of ``arm`` from a float ``model`` already on ``device``."""
    generator = torch.Generator(device=device).manual_seed(1)
    calib_shape = (min(shape[0], 8), *shape[1:])
    calib = [torch.randn(calib_shape, generator=generator, device=device) for _ in range(calib_batches)]
    if arm == "fp32":
        return model.train()
    if arm == "torch_ao_lsq":
        return prepare_torch_ao_lsq(model, (calib[0],), config.w_bits, config.a_bits).train()
    select = ptqat_fx.Select("all") if arm in ("ours_qat", "floor_all") else ptqat_fx.Select("small", fraction=0.5)
    quantized = ptqat_fx.quantize(model.train(), (calib[0],), calib, config, select, progress=False).train()
    return strip_quantizers(quantized) if arm in ("floor", "floor_all") else quantized


def _batch(shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(shape, generator=generator, device=device)
    classes = 1000 if shape[-1] == 224 else 10
    return x, torch.randint(0, classes, (shape[0],), generator=generator, device=device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model: nn.Module, forward: Callable, shape: tuple[int, ...], device: torch.device, warmup: int,
               steps: int) -> dict[str, float]:
    """Median step time (ms), peak memory (bytes) and first-step time (s) of ``forward``
    (``model`` or its compiled form) training ``model``."""
    x, y = _batch(shape, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1e-4, momentum=0.9)

    def step() -> None:
        loss = F.cross_entropy(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - start
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for begin, end in events:
            begin.record()
            step()
            end.record()
        _sync(device)
        times = [begin.elapsed_time(end) for begin, end in events]
        peak = torch.cuda.max_memory_allocated(device)
    else:
        times = []
        for _ in range(steps):
            begin = time.perf_counter()
            step()
            times.append((time.perf_counter() - begin) * 1e3)
        peak = 0
    return {"step_ms": statistics.median(times), "peak_bytes": peak, "first_step_s": first,
            "trainable_params": sum(p.numel() for p in trainable)}


def _eager_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for parameter in trainable.values():
        parameter.grad = None
    F.cross_entropy(model(x), y).backward()
    grads = {name: p.grad.detach().float().clone() for name, p in trainable.items()}
    for parameter in trainable.values():
        parameter.grad = None
    return grads


def kernels_off_row(model: nn.Module, shape: tuple[int, ...], device: torch.device, args: argparse.Namespace,
                    x: torch.Tensor, y: torch.Tensor, label: str) -> dict:
    """The eager step of ``model`` with the fused LSQ kernels off (the pure-torch quantizer),
    after checking that its gradients are the kernels' (within ``KERNEL_TOLERANCE``: the
    kernels sum step gradients in another order); raises ``GradientCheckError`` otherwise."""
    with_kernels = _eager_gradients(model, x, y)
    lsq_kernels.ENABLED = False
    try:
        without = _eager_gradients(model, x, y)
        worst, worst_name = 0.0, None
        for name, grad in with_kernels.items():
            difference = float((without[name] - grad).norm() / grad.norm().clamp_min(1e-30))
            if not difference <= worst:
                worst, worst_name = difference, name
        if not worst <= KERNEL_TOLERANCE:
            raise GradientCheckError(f"{label}: the fused kernels' gradient of {worst_name} differs from the "
                                     f"pure-torch quantizer's by {worst:.2e} (tolerance {KERNEL_TOLERANCE:.0e})")
        row = time_steps(model, model, shape, device, args.warmup, args.steps)
    finally:
        lsq_kernels.ENABLED = True
    return {**row, "kernels_vs_torch_worst_rel_diff": worst, "worst_tensor": worst_name}


def profile_steps(model: nn.Module, shape: tuple[int, ...], device: torch.device, rows: int) -> str:
    """The top ops by self device time over 3 steps, as the torch profiler's table."""
    generator = torch.Generator(device=device).manual_seed(3)
    x = torch.randn(shape, generator=generator, device=device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    activities = [torch.profiler.ProfilerActivity.CPU]
    sort = "self_cpu_time_total"
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        sort = "self_cuda_time_total"
    for _ in range(2):
        model(x).float().square().mean().backward()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            loss = model(x).float().square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        _sync(device)
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small inputs and models: a CPU smoke run")
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--arms", nargs="*", default=list(ARMS))
    parser.add_argument("--compile-arms", nargs="*", default=[])
    parser.add_argument("--compile-backend", default="inductor", help="aot_eager for a quick CPU check")
    parser.add_argument("--profile-arms", nargs="*", default=[])
    parser.add_argument("--kernels-off-too", action="store_true",
                        help="also time each quantized arm eager with the fused LSQ kernels off (row '<arm> kernels off')")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--calib-batches", type=int, default=2)
    parser.add_argument("--observer", default="mse", help="minmax calibrates fastest; step times do not depend on it")
    parser.add_argument("--budget-s", type=float, default=1e9, help="skip arms started after this many seconds")
    parser.add_argument("--out", default="bench/train_step.json")
    parser.add_argument("--profile-out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True  # as cuDNN convolutions already do: TF32 for every arm
    models = build_models(args.tiny)
    config = ptqat_fx.QuantConfig(w_bits=4, a_bits=8, w_observer=args.observer, a_observer=args.observer)
    started = time.perf_counter()
    results: dict[str, dict] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                                "torch": torch.__version__, "models": {}}
    profiles = []
    names = args.models or list(models)
    # Arm by arm over the models, float arms first: their own eager/compiled difference sets
    # the quantized arms' tolerance, and a time budget drops whole arms last.
    arms = sorted(args.arms, key=lambda arm: arm not in FLOAT_ARMS)
    bases: dict[str, nn.Module] = {}
    float_diffs: dict[str, list[float]] = {name: [] for name in names}
    floors: dict[tuple[str, str], dict[str, float]] = {}  # (model, float arm) -> per-tensor compiled diffs
    for arm, name in [(arm, name) for arm in arms for name in names]:
        build, shape = models[name]
        if name not in bases:
            torch.manual_seed(0)
            bases[name] = build()
        rows = results["models"].setdefault(name, {})
        torch._dynamo.reset()
        labels = [arm] + ([f"{arm} compiled"] if arm in args.compile_arms else [])
        labels += [f"{arm} kernels off"] if args.kernels_off_too and arm not in FLOAT_ARMS else []
        if time.perf_counter() - started > args.budget_s:
            rows.update({label: {"skipped": "time budget"} for label in labels})
            continue
        try:
            model = make_arm(arm, copy.deepcopy(bases[name]).to(device), shape, device, args.calib_batches, config)
            gc.collect()  # nothing of the previous arm or of quantize() counts in this arm's peak
            x, y = _batch(shape, device)
            compiled = torch.compile(model, backend=args.compile_backend) if arm in args.compile_arms else None
            tolerance = tolerance_from_floor(float_diffs[name]) if arm not in FLOAT_ARMS and float_diffs[name] else None
            # The eager arm is checked (and timed) on its own, so that a compiled refusal keeps it.
            eager_check = grad_check(model, None, (x,), lambda out: F.cross_entropy(out, y), label=f"{name}/{arm}")
            eager_check.pop("diffs")
            rows[arm] = {**time_steps(model, model, shape, device, args.warmup, args.steps), "grad_check": eager_check}
            if args.kernels_off_too and arm not in FLOAT_ARMS:
                rows[f"{arm} kernels off"] = kernels_off_row(model, shape, device, args, x, y, f"{name}/{arm}")
            if compiled is not None:
                # Quantized arms: per-tensor bounds from their floor arm's tensors (same names) and
                # from one ulp of input (bench.grad_check).
                floor = floors.get((name, FLOOR_OF.get(arm, "")), floors.get((name, "floor")))
                try:
                    check = grad_check(model, compiled, (x,), lambda out: F.cross_entropy(out, y), tolerance,
                                       f"{name}/{arm} compiled", sensitivity=arm not in FLOAT_ARMS,
                                       floor=None if arm in FLOAT_ARMS else floor)
                except GradientCheckError as error:
                    rows[f"{arm} compiled"] = {"error": f"GradientCheckError: {str(error)[:600]}"}
                else:
                    if arm in FLOAT_ARMS:
                        float_diffs[name].append(check["worst_rel_diff"])
                        floors[(name, arm)] = check["diffs"]
                    check = {key: value for key, value in check.items() if key != "diffs"}
                    rows[f"{arm} compiled"] = {**time_steps(model, compiled, shape, device, args.warmup, args.steps),
                                               "grad_check": check}
            if arm in args.profile_arms:
                profiles.append(f"== {name} / {arm}\n{profile_steps(model, shape, device, 15)}")
                print(profiles[-1], flush=True)
                if args.profile_out:
                    with open(args.profile_out, "w") as handle:
                        handle.write("\n".join(profiles))
        except Exception as error:  # a failing or refused arm is a result too
            for label in labels:
                rows.setdefault(label, {"error": f"{type(error).__name__}: {str(error)[:600]}"})
        model = compiled = None
        # A GraphModule is a reference cycle (with its Graph): without a collection the arm's
        # model, gradients and quantize() leftovers stay allocated into the next arm's peak.
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for label in labels:
            print(f"{name:10} {label:28} {json.dumps(rows.get(label))}", flush=True)
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    print_table(results)


def print_table(results: dict) -> None:
    """Markdown table: step time and peak memory, their ratios to FP32 in the same mode (eager,
    or compiled where FP32 compiled ran), and each quantized arm's step time over its floor."""
    print(f"\ndevice: {results['device']}, torch {results['torch']}")
    print("| model | arm | step ms | x FP32 step | x floor step | peak GB | x FP32 peak | trainable params |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rows in results["models"].items():
        for label, row in rows.items():
            compiled = label.endswith(" compiled")
            suffix = " compiled" if compiled else ""
            base = rows.get("fp32" + suffix, {})
            if "step_ms" not in row:
                print(f"| {name} | {label} | {row.get('error') or row.get('skipped')} | | | | | |")
                continue
            arm = label.removesuffix(" compiled").removesuffix(" kernels off")
            floor = rows.get(FLOOR_OF.get(arm, "") + suffix, {})
            time_ratio = row["step_ms"] / base["step_ms"] if "step_ms" in base else float("nan")
            floor_ratio = row["step_ms"] / floor["step_ms"] if "step_ms" in floor else float("nan")
            memory_ratio = row["peak_bytes"] / base["peak_bytes"] if base.get("peak_bytes") else float("nan")
            print(f"| {name} | {label} | {row['step_ms']:.1f} | {time_ratio:.2f} | {floor_ratio:.2f} "
                  f"| {row['peak_bytes'] / 1e9:.2f} | {memory_ratio:.2f} | {row['trainable_params']:,} |")


if __name__ == "__main__":
    main()
