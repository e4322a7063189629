"""Agreement of a default onnxruntime session (every graph optimization on) with the
simulation, in output steps: against ``convert(arithmetic="engine")`` (integer accumulation,
int32 biases: what the exported file computes) and against ``convert()`` (float Q/DQ, the
fake-quant model's arithmetic), at W8A8 and W4A8 (min-max observers).

Output step: ``s_in * max|W|`` of the last layer (``verify.output_step``). Argmax over the
last axis (classifiers) or over each class map (BEVDet's heads). CPU, deterministic.

    PYTHONPATH=. python bench/engine_agreement.py [--out bench/engine_agreement.json] [--smoke]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import tempfile

import numpy as np
import onnxruntime
import torch

import ptqat_fx
from examples import mlp, resnet_small, vit_small
from ptqat_fx.export.verify import output_step, step_agreement
from tests.zoo.torchvision_zoo import load_torchvision, randomize_zero_weights


def _examples() -> dict:
    def classifier(build, shape, batch):
        def make():
            generator = torch.Generator().manual_seed(2)
            calib = [torch.randn((8, *shape), generator=generator) for _ in range(2)]
            return build(), calib, (torch.randn((batch, *shape), generator=generator),)
        return make

    def torchvision_model(name):
        def make():
            torch.manual_seed(0)
            model = randomize_zero_weights(getattr(load_torchvision().models, name)(weights=None)).eval()
            generator = torch.Generator().manual_seed(1)
            calib = [torch.randn(2, 3, 64, 64, generator=generator) for _ in range(2)]
            return model, calib, (torch.randn(4, 3, 64, 64, generator=generator),)
        return make

    def bevdet():
        from examples.bev import scenes
        from examples.bev.train import build

        module = importlib.import_module("examples.bev.bevdet")
        batches = [module.inputs(torch.utils.data.default_collate([scenes.make_sample(s)])) for s in (7, 8, 9)]
        return build("bevdet", "examples/checkpoints/bevdet.pt").eval(), batches[:2], batches[2]

    return {
        "MLP": classifier(mlp.build, (784,), 128),
        "SmallResNet": classifier(resnet_small.build, (3, 16, 16), 128),
        "SmallViT": classifier(vit_small.build, (1, 28, 28), 128),
        "BEVDet (stand-in)": bevdet,
        "ResNet-50 (tv, 64x64)": torchvision_model("resnet50"),
        "ResNet-101 (tv, 64x64)": torchvision_model("resnet101"),
    }


def _flat(outputs) -> list[np.ndarray]:
    outputs = list(outputs.values()) if isinstance(outputs, dict) else outputs
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return [o.detach().numpy() if isinstance(o, torch.Tensor) else o for o in outputs]


def _rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[1], -1) if a.ndim == 4 else a  # (1, C, H, W) heads: one row per class map


def measure(make, w_bits: int) -> dict:
    model, calib, x = make()
    config = ptqat_fx.QuantConfig(w_bits=w_bits, a_bits=8, w_observer="minmax", a_observer="minmax")
    qmodel = ptqat_fx.quantize(model, calib[0] if isinstance(calib[0], tuple) else (calib[0],), calib, config,
                               select=None, progress=False).eval()
    example = calib[0] if isinstance(calib[0], tuple) else (calib[0],)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "m.onnx")
        ptqat_fx.export_onnx(qmodel, example, path, dynamic_batch=not isinstance(calib[0], tuple))
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        feeds = dict(zip([i.name for i in session.get_inputs()], (t.numpy() for t in x)))
        got = session.run(None, feeds)
    step, row = output_step(qmodel), {}
    for arithmetic in ("engine", "fake_quant"):
        with torch.no_grad():
            want = _flat(ptqat_fx.convert(qmodel, arithmetic=arithmetic)(*x))
        found = [step_agreement(_rows(g), _rows(w), step) for g, w in zip(got, want)]
        row[arithmetic] = {"max_steps": max(f.max_steps for f in found),
                           "within_one_step": min(f.within_one_step for f in found),
                           "argmax_changed": max(f.argmax_changed for f in found)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/engine_agreement.json")
    parser.add_argument("--smoke", action="store_true", help="the three small examples only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = _examples()
    if args.smoke:
        models = {k: models[k] for k in ("MLP", "SmallResNet", "SmallViT")}
    if load_torchvision() is None:
        models = {k: v for k, v in models.items() if "tv" not in k}
    results = {"machine": f"{platform.processor() or platform.machine()}, onnxruntime {onnxruntime.__version__}",
               "rows": {f"{name} W{bits}A8": measure(make, bits) for name, make in models.items() for bits in (8, 4)}}
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)
    print(f"| model | vs engine convert: max steps / <=1 step / argmax changed | vs float convert |")
    print("|---|---|---|")
    for name, row in results["rows"].items():
        cells = [f"{r['max_steps']:.2f} / {100 * r['within_one_step']:.2f}% / {100 * r['argmax_changed']:.2f}%"
                 for r in (row["engine"], row["fake_quant"])]
        print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
