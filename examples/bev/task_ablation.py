"""PTQ and the PTQAT arms on a dense task: mIoU at W4A8 and at a setting where PTQ loses >= 2 points.

    python -m examples.bev.task_ablation --task bevdet_seg --checkpoint examples/checkpoints/bevdet_seg.pt --json $OUT/abl.json

The FP variant (``tasks.task(name)``) is quantized per setting once (calibration and the
discrepancy analysis on ``--calib`` training scenes); from that same PTQ state every arm selects
and freezes its own copy and fine-tunes with the same data, steps and learning rate: PTQ (nothing
trained), PTQAT (``small`` 0.5), ``large`` 0.5, ``random`` 0.5 and full QAT (``all``). Loss:
distillation from the FP model (``--loss distill``, as ``ablation.py``) or the task loss.
Settings: PTQ at W4A8 and W4A4 always; the arms at W4A8 and at the first of ``HARD`` where PTQ
loses at least ``--min-drop`` mIoU (the last one, flagged, if none does).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch

import ptqat_fx
from examples.bev import tasks
from ptqat_fx.passes.discrepancy import discrepancy
from ptqat_fx.passes.freeze import freeze
from ptqat_fx.passes.select import select_layers

ARMS = {
    "PTQAT (small 0.5)": ptqat_fx.Select("small", fraction=0.5),
    "large 0.5": ptqat_fx.Select("large", fraction=0.5),
    "random 0.5": ptqat_fx.Select("random", fraction=0.5, seed=0),
    "full QAT (all)": ptqat_fx.Select("all"),
}
HARD = ((4, 4), (3, 4), (3, 3))
TRAIN_SEED = 500_000          # calibration and fine-tuning scenes: not the FP training seeds, not validation


def analysed_ptq(model: torch.nn.Module, calib: list[tuple[torch.Tensor, ...]], n_inputs: int, w_bits: int, a_bits: int) -> torch.fx.GraphModule:
    """The calibrated and analysed PTQ state every arm of a setting starts from."""
    example = calib[0][:n_inputs]
    gm = ptqat_fx.quantize(model, example, calib, ptqat_fx.QuantConfig(w_bits=w_bits, a_bits=a_bits), select=None, progress=False)
    return discrepancy(gm, calib, n_inputs, progress=False)


def arms(task: tasks.Task, model: torch.nn.Module, analysed: torch.fx.GraphModule, data: list[tuple[torch.Tensor, ...]],
         args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """mIoU (and trainable layer parameters) of PTQ and of every fine-tuned arm from ``analysed``."""
    rows = {}
    for name, select in {"PTQ (none)": ptqat_fx.Select("none"), **ARMS}.items():
        arm = freeze(select_layers(copy.deepcopy(analysed), select))
        trainable = ptqat_fx.report(arm).trainable_quantizable_params
        start = time.perf_counter()
        if select.strategy != "none":
            torch.manual_seed(0)
            kwargs = {"teacher": model} if args.loss == "distill" else {"loss": task.loss_fn, "loss_takes": "batch"}
            ptqat_fx.finetune(arm.train(), data, steps=args.steps, lr=args.lr, progress=False, **kwargs)
        rows[name] = {**task.evaluate(arm), "trainable_layer_params": trainable, "finetune_s": round(time.perf_counter() - start, 1)}
        print(f"  {name:<20} mIoU {rows[name]['mIoU']:.4f}", flush=True)
    return rows


def markdown_table(paths: list[str]) -> str:
    """One markdown table of mIoU per task, setting and arm from ``task_ablation`` JSON files."""
    lines = ["| task | setting | FP | " + " | ".join(["PTQ", *ARMS]) + " |", "|---" * (len(ARMS) + 4) + "|"]
    for path in paths:
        with open(path) as handle:
            run = json.load(handle)
        for setting, rows in run["arms"].items():
            cells = [f"{rows[name]['mIoU']:.3f}" + (f" ({rows[name]['trainable_layer_params']:,})" if name in ARMS else "")
                     for name in ("PTQ (none)", *ARMS)]
            lines.append(f"| {run['args']['task']} | {setting} | {run['fp']['mIoU']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["table"]:
        print(markdown_table(sys.argv[2:]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=tasks.TASKS, required=True)
    parser.add_argument("--checkpoint", default=None, help="FP task checkpoint (default examples/checkpoints/<task>.pt)")
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps per arm")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--finetune-scenes", type=int, default=200, help="scenes the steps cycle through")
    parser.add_argument("--calib", type=int, default=8, help="calibration / analysis scenes (batches of 2)")
    parser.add_argument("--val-samples", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--loss", choices=("distill", "task"), default="distill")
    parser.add_argument("--min-drop", type=float, default=0.02)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    wall = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    task = tasks.task(args.task, args.checkpoint, device, args.val_samples)
    model = task.build_model()
    n_inputs = len(tasks.spec(args.task).module.inputs(tasks.render_batches(args.task, TRAIN_SEED, 1, 1, device)[0]))
    calib = task.make_train_batches(TRAIN_SEED, args.calib, 2)
    data = task.make_train_batches(TRAIN_SEED + args.calib, args.finetune_scenes, args.batch)
    fp = task.evaluate(model)
    print(f"{args.task}: FP mIoU {fp['mIoU']:.4f} ({time.perf_counter() - wall:.0f} s)", flush=True)
    results: dict[str, object] = {"args": vars(args), "fp": fp, "ptq": {}, "arms": {}}

    def save() -> None:
        # After every stage, so a run cut short by its time limit keeps what it measured.
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(results, handle, indent=1)
    states = {}
    for bits in ((4, 8), (4, 4)):
        states[bits] = analysed_ptq(model, calib, n_inputs, *bits)
        results["ptq"][f"W{bits[0]}A{bits[1]}"] = task.evaluate(freeze(select_layers(copy.deepcopy(states[bits]), ptqat_fx.Select("none"))))
    hard = HARD[-1]
    for bits in HARD:
        key = f"W{bits[0]}A{bits[1]}"
        if key not in results["ptq"]:
            states[bits] = analysed_ptq(model, calib, n_inputs, *bits)
            results["ptq"][key] = task.evaluate(freeze(select_layers(copy.deepcopy(states[bits]), ptqat_fx.Select("none"))))
        if fp["mIoU"] - results["ptq"][key]["mIoU"] >= args.min_drop:
            hard = bits
            break
    results["hard_setting"] = f"W{hard[0]}A{hard[1]}"
    results["hard_drop_reached"] = fp["mIoU"] - results["ptq"][results["hard_setting"]]["mIoU"] >= args.min_drop
    save()
    for bits in dict.fromkeys(((4, 8), hard)):
        key = f"W{bits[0]}A{bits[1]}"
        print(f"{args.task} {key} arms ({time.perf_counter() - wall:.0f} s):", flush=True)
        results["arms"][key] = arms(task, model, states[bits], data, args)
        save()
    results["total_s"] = round(time.perf_counter() - wall, 1)
    print(f"\n{args.task}: FP mIoU {fp['mIoU']:.4f}; PTQ " + ", ".join(f"{k} {v['mIoU']:.4f}" for k, v in results["ptq"].items()))
    print(f"{'setting':<8} {'arm':<20} {'mIoU':>7} {'trainable layer params':>23}")
    for key, rows in results["arms"].items():
        for name, row in rows.items():
            print(f"{key:<8} {name:<20} {row['mIoU']:7.4f} {row['trainable_layer_params']:>23,}")
    print(f"total {results['total_s']:.0f} s")
    save()


if __name__ == "__main__":
    main()
