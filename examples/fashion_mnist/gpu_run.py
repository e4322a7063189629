"""The Fashion-MNIST experiment in one GPU call: train both FP models if no checkpoint exists,
then run as many (model x bits x seed x arm) cells as fit before the deadline, resuming.

    OUT=/some/dir PYTHONPATH=. python3 -m examples.fashion_mnist.gpu_run [--seconds 450]

Reads FP checkpoints from ``examples/checkpoints/fmnist_<model>.pt`` (else ``$OUT``, else trains
them and writes them to ``$OUT``) and earlier results from ``--resume`` (copied to
``$OUT/results.json`` and continued there). Copy ``$OUT``'s files back (checkpoints to
examples/checkpoints/, results.json to the ``--resume`` path) before the next call. ``--curve``
runs the learning curve instead (one model and bit setting, four arms, ``--curve-steps`` steps,
the metric every ``--curve-every``), into ``$OUT/curve.json``. ``--workers N`` runs N processes
on the one GPU (tiny models leave it mostly idle), each on its own (bits, seed) groups; their
fine-tune times are then measured side by side, not alone.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from examples import experiment
from examples.fashion_mnist import data, models
from examples.fashion_mnist.task import make_task

CHECKPOINTS = Path("examples/checkpoints")
TARGET_ACCURACY = {"resnet": 91.0, "vit": 88.0}  # the FP accuracy each model must reach (issue 17)
CURVE_ARMS = ("full QAT", "small 0.5 accumulated.relative", "large 0.5 accumulated.relative", "random 0.5")


def checkpoint(name: str, out: Path, arrays: dict, device: torch.device, args: argparse.Namespace) -> Path:
    """The FP checkpoint of ``name``: committed, left in ``out`` by an earlier call, or trained now."""
    for candidate in (CHECKPOINTS / f"fmnist_{name}.pt", out / f"fmnist_{name}.pt"):
        if candidate.is_file():
            print(f"{name}: FP checkpoint {candidate}, {models.load(name, str(candidate))[1]}", flush=True)
            return candidate
    model, report = models.train(name, arrays, device, epochs=args.fp_epochs, train_limit=args.train_images,
                                 test_limit=args.test_images)
    report["meets_target"] = report["test_accuracy"] >= TARGET_ACCURACY[name]
    path = out / f"fmnist_{name}.pt"
    models.save(model, report, str(path))
    print(f"{name}: trained, {report}", flush=True)
    return path


def run_share(args: argparse.Namespace, tasks: list[experiment.Task], out: Path, deadline: float) -> dict:
    """Run this process's (bits, seed) groups, both models each, one bit setting before the next;
    all of them without ``--workers``, every ``workers``-th one (from ``worker``) with it."""
    path = out / ("results.json" if args.worker is None else f"part{args.worker}.json")
    if Path(args.resume).is_file():
        shutil.copyfile(args.resume, path)
    groups = [(bits, seed) for bits in args.bits for seed in args.seeds]
    if args.worker is not None:
        groups = groups[args.worker:: args.workers]
    budget = experiment.Budget(steps=args.steps, lr=args.lr)
    results, slowest = experiment.load_results(path, budget), {}
    for bits, seed in groups:
        results = experiment.run_grid(tasks, [bits], [seed], budget, path, deadline=deadline, slowest=slowest)
    return results


def run_workers(args: argparse.Namespace, out: Path, deadline: float) -> dict:
    """Start ``args.workers`` copies of this script on disjoint groups, wait, merge their JSON into
    ``out/results.json``. Their fine-tune times are measured while sharing the GPU."""
    seconds = deadline - time.perf_counter() - 20  # leave time to merge and print
    children = [subprocess.Popen([sys.executable, "-m", "examples.fashion_mnist.gpu_run", *sys.argv[1:],
                                  "--worker", str(k), "--seconds", str(seconds)]) for k in range(args.workers)]
    codes = [child.wait() for child in children]
    budget = experiment.Budget(steps=args.steps, lr=args.lr)
    merged = experiment.load_results(Path(args.resume), budget)
    for k in range(args.workers):
        part_path = out / f"part{k}.json"
        if not part_path.is_file():
            continue
        experiment.merge_results(merged, json.loads(part_path.read_text()))
        part_path.unlink()
    merged["workers"] = args.workers
    (out / "results.json").write_text(json.dumps(merged, indent=1))
    print(f"workers exited with {codes}", flush=True)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=450, help="wall-time budget of the whole call")
    parser.add_argument("--models", nargs="+", default=["resnet", "vit"])
    parser.add_argument("--bits", nargs="+", default=list(experiment.DEFAULT_BITS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=experiment.Budget.steps)
    parser.add_argument("--lr", type=float, default=experiment.Budget.lr)
    parser.add_argument("--resume", default="docs/results_fmnist.json")
    parser.add_argument("--curve", action="store_true", help="run the learning curve instead of the grid")
    parser.add_argument("--curve-steps", type=int, default=1200)
    parser.add_argument("--curve-every", type=int, default=150)
    parser.add_argument("--fp-epochs", type=int, default=None, help="override the recipes (CPU smoke runs)")
    parser.add_argument("--train-images", type=int, default=None, help="first N training images only (CPU smoke runs)")
    parser.add_argument("--test-images", type=int, default=None)
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the GPU, each on its own (bits, seed) groups")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    deadline = time.perf_counter() + args.seconds
    out = Path(os.environ["OUT"])
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arrays = data.load()
    tasks = [make_task(name, str(checkpoint(name, out, arrays, device, args)), device=device,
                       train_images=args.train_images, test_images=args.test_images, arrays=arrays)
             for name in args.models]
    print(f"FP models ready at {args.seconds - (deadline - time.perf_counter()):.0f} s", flush=True)
    if args.curve:
        budget = experiment.Budget(steps=args.curve_steps, lr=args.lr)
        results = experiment.run_grid(tasks[:1], args.bits[:1], args.seeds, budget, out / "curve.json", deadline=deadline,
                                      only=CURVE_ARMS, curve_every=args.curve_every)
    elif args.workers > 1 and args.worker is None:
        results = run_workers(args, out, deadline)
    else:
        results = run_share(args, tasks, out, deadline)
    if args.worker is not None:
        return
    grid = [(t.name, b, s, a) for t in tasks for b in args.bits for s in args.seeds for a in experiment.arms(s)]
    done = sum(experiment.cell_key(*cell) in results["cells"] for cell in grid)
    print(f"\n{done} of {len(grid)} grid cells done; {time.perf_counter() - deadline + args.seconds:.0f} s used", flush=True)
    print(experiment.table(results))
    (out / "summary.json").write_text(json.dumps({"done": done, "grid": len(grid), "device": str(device)}))


if __name__ == "__main__":
    main()
