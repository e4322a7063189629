"""Train one BEV stand-in in floating point on synthetic scenes, evaluate its mAP, save a checkpoint.

    python -m examples.bev.train --model bevdet --steps 3000 --out examples/checkpoints/bevdet.pt

Training scenes are seeds ``seed .. seed + train_samples - 1``, rendered once on the device and
kept there (images in fp16); validation scenes start at ``VAL_SEED``. ``--train-seconds`` caps the
wall time: the learning rate follows a cosine over ``max(step / steps, elapsed / train_seconds)``,
so a capped run still ends annealed, and the JSON says how many steps ran.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import time
from collections.abc import Callable
from types import ModuleType

import torch

from examples.bev import metric, scenes

MODELS = ("bevdet", "bevdepth4d", "bevformer", "sparsebev")
VAL_SEED = 1_000_000
DEFAULT_LR = {"bevdet": 2e-3, "bevdepth4d": 2e-3, "bevformer": 1e-3, "sparsebev": 1e-3}


def model_module(name: str) -> ModuleType:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
    return importlib.import_module(f"examples.bev.{name}")


def build(name: str, checkpoint: str | None = None) -> torch.nn.Module:
    """The model ``name``, with float weights from ``checkpoint`` (a saved fp16 state_dict) if given."""
    model = getattr(model_module(name), f"build_{name}")()
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state["state_dict"].items()})
    return model


def render_set(seed: int, count: int, device: torch.device, max_seconds: float = float("inf"), frames: int = 2,
               dense: bool = False) -> dict[str, torch.Tensor]:
    """Samples ``seed ..`` stacked on ``device`` (images and depth in fp16); stops early after ``max_seconds``."""
    start, samples = time.perf_counter(), []
    for i in range(count):
        sample = scenes.make_sample(seed + i, device, frames, dense)
        sample.pop("instances")
        samples.append({k: (v.half() if k in ("imgs", "depth") else v).to(device) for k, v in sample.items()})
        if time.perf_counter() - start > max_seconds:
            break
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def take(data: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: (v[index].float() if v.dtype == torch.float16 else v[index]) for k, v in data.items()}


@torch.no_grad()
def evaluate(model: torch.nn.Module, module: ModuleType, data: dict[str, torch.Tensor], batch: int = 8,
             decode: Callable[[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]] | None = None) -> dict[str, float]:
    """Metrics of ``model`` on ``data``; ``decode`` defaults to ``model.decode`` (pass the float model's
    for a quantized GraphModule, which has none)."""
    model.eval()
    decode = decode or model.decode
    predictions, targets = [], []
    count = len(data["labels"])
    for first in range(0, count, batch):
        chunk = take(data, torch.arange(first, min(first + batch, count), device=data["labels"].device))
        predictions += decode(model(*module.inputs(chunk)))
        targets += metric.ground_truth(chunk)
    return metric.evaluate(predictions, targets)


def fit(model: torch.nn.Module, inputs: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, ...]],
        train_set: dict[str, torch.Tensor], args: argparse.Namespace, lr: float, name: str) -> int:
    """Train ``model`` on its ``loss`` over random batches of ``train_set``; returns the steps run.

    AdamW, 100 warm-up steps, cosine over ``max(step / args.steps, elapsed / args.train_seconds)``,
    grad-norm clip 10; ``args`` gives steps, train_seconds, batch, seed and log_every."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(args.seed)
    n_train, device = len(train_set["labels"]), train_set["labels"].device
    start, step = time.perf_counter(), 0
    model.train()
    while True:
        progress = max(step / args.steps, (time.perf_counter() - start) / args.train_seconds)
        if progress >= 1.0:
            return step
        warm = min(1.0, (step + 1) / 100)
        for group in optimiser.param_groups:
            group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * progress))
        batch = take(train_set, torch.randint(0, n_train, (args.batch,), generator=gen).to(device))
        losses = model.loss(model(*inputs(batch)), batch)
        loss = sum(losses.values())
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimiser.step()
        step += 1
        if step % args.log_every == 0:
            parts = " ".join(f"{k}={v.item():.3f}" for k, v in losses.items())
            print(f"{name} step {step} progress {progress:.2f} loss {loss.item():.3f} ({parts})", flush=True)


def train(args: argparse.Namespace) -> dict[str, object]:
    device = torch.device(args.device if args.device else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    module = model_module(args.model)
    model = build(args.model).to(device)
    t0 = time.perf_counter()
    train_set = render_set(args.seed, args.train_samples, device, args.render_seconds)
    val_set = render_set(VAL_SEED, args.val_samples, device, args.render_seconds)
    render_s = time.perf_counter() - t0
    n_train = len(train_set["labels"])
    print(f"{args.model}: rendered {n_train} train / {len(val_set['labels'])} val scenes in {render_s:.0f}s", flush=True)
    lr = args.lr or DEFAULT_LR[args.model]
    t1 = time.perf_counter()
    step = fit(model, module.inputs, train_set, args, lr, args.model)
    train_s = time.perf_counter() - t1
    result = evaluate(model, module, val_set)
    train_map = evaluate(model, module, {k: v[: len(val_set["labels"])] for k, v in train_set.items()})["mAP"]
    state = {k: (v.half() if v.is_floating_point() else v).cpu() for k, v in model.state_dict().items()}
    report = {
        "model": args.model, "steps": step, "batch": args.batch, "lr": lr, "train_samples": n_train,
        "val_samples": len(val_set["labels"]), "render_s": round(render_s, 1), "train_s": round(train_s, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": str(torch.__version__),
        "params": sum(p.numel() for p in model.parameters()), "train_mAP": train_map, **result,
    }
    if args.out:
        torch.save({"model": args.model, "state_dict": state, "report": report}, args.out)
    print(json.dumps(report), flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default per model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--val-samples", type=int, default=200)
    parser.add_argument("--render-seconds", type=float, default=float("inf"), help="cap on rendering each set")
    parser.add_argument("--train-seconds", type=float, default=float("inf"), help="cap on the training loop")
    parser.add_argument("--device", default=None)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--out", default=None, help="checkpoint path (fp16 state_dict + report)")
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args()
    report = train(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
