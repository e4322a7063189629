"""Train a dense-task variant in floating point from its detection checkpoint's trunk; mIoU; checkpoint.

    python -m examples.bev.train_tasks --task bevdet_seg --train-seconds 180 --out $OUT/bevdet_seg.pt --json $OUT/bevdet_seg.json

Parameters whose names and shapes match the detection checkpoint (``tasks.spec(task).trunk_checkpoint``:
trunk, view transform, BEV encoder) start from it; the new head starts fresh. Scenes are rendered
with ``dense=True`` (road layout painted, dense targets), training seeds from ``--seed``,
validation from ``tasks.VAL_SEED``, and trained with ``train.fit`` (AdamW, warm-up, cosine over the
step or time cap). The checkpoint is an fp16 state_dict with the report, as for detection.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from examples.bev import tasks, train


def val_batches(data: dict[str, torch.Tensor], batch: int = 8) -> list[dict[str, torch.Tensor]]:
    count = len(data["labels"])
    return [train.take(data, torch.arange(i, min(i + batch, count), device=data["labels"].device)) for i in range(0, count, batch)]


def run(args: argparse.Namespace) -> dict[str, object]:
    device = torch.device(args.device if args.device else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    spec = tasks.spec(args.task)
    model = spec.build()
    loaded = tasks.load_matching(model, args.trunk or spec.trunk_checkpoint) if args.trunk != "none" else []
    model.to(device)
    t0 = time.perf_counter()
    train_set = train.render_set(args.seed, args.train_samples, device, args.render_seconds, spec.frames, dense=True)
    val_set = train.render_set(tasks.VAL_SEED, args.val_samples, device, args.render_seconds, spec.frames, dense=True)
    render_s = time.perf_counter() - t0
    n_train = len(train_set["labels"])
    print(f"{args.task}: {len(loaded)} tensors from the detection trunk; rendered {n_train} train / "
          f"{len(val_set['labels'])} val scenes in {render_s:.0f}s", flush=True)
    t1 = time.perf_counter()
    step = train.fit(model, spec.module.inputs, train_set, args, args.lr, args.task)
    train_s = time.perf_counter() - t1
    result = tasks.evaluate(args.task, model, val_batches(val_set))
    train_miou = tasks.evaluate(args.task, model, val_batches({k: v[: len(val_set["labels"])] for k, v in train_set.items()}))["mIoU"]
    report = {
        "task": args.task, "steps": step, "batch": args.batch, "lr": args.lr, "train_samples": n_train,
        "val_samples": len(val_set["labels"]), "render_s": round(render_s, 1), "train_s": round(train_s, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": str(torch.__version__),
        "params": sum(p.numel() for p in model.parameters()), "trunk_tensors_loaded": len(loaded),
        "train_mIoU": train_miou, **result,
    }
    if args.out:
        state = {k: (v.half() if v.is_floating_point() else v).cpu() for k, v in model.state_dict().items()}
        torch.save({"model": args.task, "state_dict": state, "report": report}, args.out)
    print(json.dumps(report), flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=tasks.TASKS, required=True)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--val-samples", type=int, default=200)
    parser.add_argument("--render-seconds", type=float, default=float("inf"), help="cap on rendering each set")
    parser.add_argument("--train-seconds", type=float, default=float("inf"), help="cap on the training loop")
    parser.add_argument("--trunk", default=None, help="detection checkpoint to start from ('none': from scratch)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--out", default=None, help="checkpoint path (fp16 state_dict + report)")
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args()
    report = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
