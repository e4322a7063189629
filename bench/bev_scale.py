"""The paper's claim at real BEV size: a training step of FP32, full QAT and PTQAT (small half).

Model: a BEVDet-R50-proportioned stand-in: torchvision ResNet-50 trunk on 6 cameras at
256x704, a neck to stride 16 (512 channels), a depth net (48 depth bins, 64 context channels),
a static lift-splat (``scatter_add`` over a geometry fixed at build time from the rig of
``examples/bev``) onto a 128x128 BEV grid, ``examples.bev.lss.BEVEncoder`` and
``examples.bev.center_head.CenterHead``. Loss: mean square of every head output (timing does
not depend on the targets). Arms: ``fp32``; ``qat`` (W4A8, ``Select("all")``); ``ptqat``
(``Select("small", fraction=0.5)``); each eager and compiled after ``bench.grad_check``.

Reported per arm: step time (median, CUDA events), peak memory (``max_memory_allocated``), the
largest batch that fits ``--budget-gb`` (from the peaks at batch 1 and 2: fixed + per-sample
bytes, extrapolated linearly), and the trainable-parameter table (parameters, trainable
parameters, their share, trainable layers).

    PYTHONPATH=. python bench/bev_scale.py --device cuda --out $OUT/bev_scale.json
    PYTHONPATH=. python bench/bev_scale.py --device cpu --tiny --compile-arms --out /tmp/bev_scale.json
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import ptqat_fx
from bench.grad_check import GradientCheckError, grad_check
from examples.bev import rig
from examples.bev.center_head import CenterHead
from examples.bev.lss import BEVEncoder
from ptqat_fx.layer_spec import layer_specs
from tests.zoo.torchvision_zoo import load_torchvision

DEPTH_BINS, CONTEXT, STRIDE = 48, 64, 16


def splat_index(img_h: int, img_w: int, bev_size: int) -> torch.Tensor:
    """BEV cell of every (camera, depth, row, column) frustum point, ``bev_size**2`` for points
    outside the grid: the rig's cameras with intrinsics scaled to ``img_h x img_w``."""
    h, w = img_h // STRIDE, img_w // STRIDE
    intrins = rig.intrinsics().clone()
    intrins[:2] *= img_w / rig.IMG_W
    cam2ego = rig.cam2ego()
    depth = torch.linspace(2.0, 58.0, DEPTH_BINS)
    v, u = torch.meshgrid((torch.arange(h) + 0.5) * STRIDE, (torch.arange(w) + 0.5) * STRIDE, indexing="ij")
    u, v, d = torch.broadcast_tensors(u, v, depth[:, None, None])
    fx, fy, cx, cy = (intrins[0, 0], intrins[1, 1], intrins[0, 2], intrins[1, 2])
    cam = torch.stack([(u - cx) / fx * d, (v - cy) / fy * d, d], -1)                 # [D, h, w, 3]
    points = torch.einsum("nij,dhwj->ndhwi", cam2ego[:, :3, :3], cam) + cam2ego[:, None, None, None, :3, 3]
    cells = ((points[..., :2] + rig.RANGE) / (2 * rig.RANGE / bev_size)).floor()
    inside = (cells >= 0).all(-1) & (cells < bev_size).all(-1)
    index = (cells[..., 1] * bev_size + cells[..., 0]).long()
    return torch.where(inside, index, torch.full_like(index, bev_size * bev_size)).flatten()


class BEVDetR50(nn.Module):
    """forward(imgs [B, 6, 3, H, W]) -> dict of CenterHead maps on a ``bev_size`` grid."""

    def __init__(self, img_h: int, img_w: int, bev_size: int) -> None:
        super().__init__()
        resnet = load_torchvision().models.resnet50()
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1, resnet.layer2)
        self.layer3, self.layer4 = resnet.layer3, resnet.layer4
        self.lateral = nn.Conv2d(2048, 512, 1)
        self.neck = nn.Sequential(nn.Conv2d(1024 + 512, 512, 3, padding=1), nn.BatchNorm2d(512), nn.ReLU())
        self.depth_net = nn.Conv2d(512, DEPTH_BINS + CONTEXT, 1)
        self.register_buffer("index", splat_index(img_h, img_w, bev_size), persistent=False)
        self.bev_size = bev_size
        self.bev_encoder = BEVEncoder(CONTEXT)
        self.head = CenterHead()

    def forward(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        c4 = self.layer3(self.stem(imgs.flatten(0, 1)))
        c5 = F.interpolate(self.lateral(self.layer4(c4)), scale_factor=2.0, mode="nearest")
        x = self.depth_net(self.neck(torch.cat([c4, c5], 1))).unflatten(0, (-1, rig.NUM_CAMS))
        depth = x[:, :, :DEPTH_BINS].softmax(2)
        volume = (depth.unsqueeze(-1) * x[:, :, DEPTH_BINS:].permute(0, 1, 3, 4, 2).unsqueeze(2)).flatten(1, 4)
        index = self.index[None, :, None].expand_as(volume)
        cells = self.bev_size * self.bev_size
        bev = volume.new_zeros(volume.shape[0], cells + 1, CONTEXT).scatter_add(1, index, volume)[:, :-1]
        bev = bev.transpose(1, 2).unflatten(2, (self.bev_size, self.bev_size))
        return self.head(self.bev_encoder(bev))


def loss_fn(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(out.float().square().mean() for out in outputs.values())


def make_arm(arm: str, model: nn.Module, imgs: torch.Tensor) -> nn.Module:
    if arm == "fp32":
        return model.train()
    config = ptqat_fx.QuantConfig(w_bits=4, a_bits=8, w_observer="minmax", a_observer="minmax")
    select = ptqat_fx.Select("all") if arm == "qat" else ptqat_fx.Select("small", fraction=0.5)
    return ptqat_fx.quantize(model.train(), (imgs[:1],), [imgs[:1]], config, select, progress=False).train()


def parameter_table(model: nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if isinstance(model, torch.fx.GraphModule):
        specs = layer_specs(model)
        layers, selected = len(specs), sum(bool(spec.selected) for spec in specs)
    else:
        layers = selected = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    return {"params": total, "trainable_params": trainable, "trainable_share": trainable / total,
            "layers": layers, "trainable_layers": selected}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(model: nn.Module, forward, imgs: torch.Tensor, warmup: int, steps: int) -> dict:
    """Median step time (ms) and peak memory (bytes) of SGD steps on ``imgs``."""
    device = imgs.device
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def step() -> None:
        loss = loss_fn(forward(imgs))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"step_ms": statistics.median(times), "peak_bytes": peak}


def largest_batch(model: nn.Module, forward, shape: tuple[int, ...], device: torch.device, budget: float) -> dict:
    """Peaks at batch 1 and 2 and the largest batch under ``budget`` bytes, extrapolated."""
    peaks = [run_steps(model, forward, torch.randn((b, *shape[1:]), device=device), 1, 1)["peak_bytes"] for b in (1, 2)]
    per_sample = max(peaks[1] - peaks[0], 1)
    return {"peak_b1": peaks[0], "peak_b2": peaks[1],
            "largest_batch": int((budget - (peaks[0] - per_sample)) // per_sample)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="64x192 images, 32x32 BEV: a CPU smoke run")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--arms", nargs="*", default=["fp32", "qat", "ptqat"])
    parser.add_argument("--compile-arms", nargs="*", default=["fp32", "qat", "ptqat"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--budget-gb", type=float, default=40.0)
    parser.add_argument("--time-budget-s", type=float, default=1e9, help="compile no arm started after this many seconds")
    parser.add_argument("--out", default="bench/bev_scale.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    img_h, img_w, bev = (64, 192, 32) if args.tiny else (256, 704, 128)
    torch.manual_seed(0)
    base = BEVDetR50(img_h, img_w, bev)
    imgs = torch.randn(args.batch, rig.NUM_CAMS, 3, img_h, img_w, generator=torch.Generator().manual_seed(1)).to(device)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "images": [rig.NUM_CAMS, img_h, img_w], "bev": bev, "batch": args.batch,
               "arms": {}}
    started = time.perf_counter()
    for arm in args.arms:
        torch._dynamo.reset()
        row = results["arms"].setdefault(arm, {})
        try:
            model = make_arm(arm, copy.deepcopy(base).to(device), imgs)
            row["parameters"] = parameter_table(model)
            late = time.perf_counter() - started > args.time_budget_s
            compiled = torch.compile(model) if arm in args.compile_arms and not late else None
            row["grad_check"] = grad_check(model, None, (imgs,), loss_fn, label=f"BEV/{arm}")
            row["grad_check"].pop("diffs")
            row["eager"] = run_steps(model, model, imgs, args.warmup, args.steps)
            if device.type == "cuda":
                row["eager"].update(largest_batch(model, model, imgs.shape, device, args.budget_gb * 1e9))
            if compiled is not None:
                # Per-tensor bounds from one ulp of input (bench.grad_check): one global bound
                # cannot serve, the float arm's worst tensor is a conv bias before a BatchNorm.
                try:
                    row["compiled_grad_check"] = grad_check(model, compiled, (imgs,), loss_fn,
                                                            label=f"BEV/{arm} compiled", sensitivity=True)
                    row["compiled_grad_check"].pop("diffs")
                    row["compiled"] = run_steps(model, compiled, imgs, args.warmup, args.steps)
                except GradientCheckError as error:
                    row["compiled"] = {"refused": str(error)[:900]}
            elif arm in args.compile_arms:
                row["compiled"] = {"skipped": "time budget"}
        except Exception as error:  # a failing or refused arm is a result too
            row["error"] = f"{type(error).__name__}: {str(error)[:600]}"
        model = compiled = None
        gc.collect()  # a GraphModule is a reference cycle: free the arm before the next one's peak
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"{arm:6} {json.dumps(row)}", flush=True)
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    print_table(results)


def print_table(results: dict) -> None:
    arms = results["arms"]
    print(f"\ndevice: {results['device']}, torch {results['torch']}, images {results['images']}, BEV {results['bev']}")
    print("| arm | mode | step ms | x QAT step | peak GB | x QAT peak | largest batch | params | trainable | share |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arm, row in arms.items():
        if "error" in row:
            print(f"| {arm} | | {row['error']} |")
            continue
        table = row["parameters"]
        for mode in ("eager", "compiled"):
            cell = row.get(mode)
            if not cell or "step_ms" not in cell:
                continue
            qat = arms.get("qat", {}).get(mode, {})
            t = cell["step_ms"] / qat["step_ms"] if "step_ms" in qat else float("nan")
            m = cell["peak_bytes"] / qat["peak_bytes"] if qat.get("peak_bytes") else float("nan")
            print(f"| {arm} | {mode} | {cell['step_ms']:.1f} | {t:.2f} | {cell['peak_bytes'] / 1e9:.2f} | {m:.2f} "
                  f"| {cell.get('largest_batch', '')} | {table['params']:,} | {table['trainable_params']:,} "
                  f"| {table['trainable_share']:.1%} |")


if __name__ == "__main__":
    main()
