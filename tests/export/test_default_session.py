"""Acceptance of issue 14: a default ``onnxruntime.InferenceSession`` (every graph optimization
on) and ``onnx.reference`` agree with ``convert(qmodel, arithmetic="engine")`` within one output
step on at least 99.9% of outputs, with no argmax (or heatmap peak) changed."""
from __future__ import annotations

import importlib

import numpy as np
import onnxruntime
import pytest
import torch

import ptqat_fx
from ptqat_fx.export.verify import output_step, run_onnx, step_agreement
from tests.export.quantized_examples import EXAMPLES, example_input, quantized

MIN_WITHIN_ONE_STEP = 0.999


def _default_session(path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name,w_bits", [(name, bits) for name in EXAMPLES for bits in (8, 4)])
def test_default_session_agrees_with_engine_convert_on_the_examples(name, w_bits, tmp_path):
    qmodel = quantized(name, w_bits)
    ptqat_fx.export_onnx(qmodel, (example_input(name),), tmp_path / "m.onnx", dynamic_batch=True)
    x = torch.randn((128, *EXAMPLES[name][1][1:]), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ptqat_fx.convert(qmodel, arithmetic="engine")(x).numpy()
    session = _default_session(tmp_path / "m.onnx")
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    found = step_agreement(got, expected, output_step(qmodel))
    assert found.within_one_step >= MIN_WITHIN_ONE_STEP and found.argmax_changed == 0.0, found


@pytest.mark.slow  # ~25 s: a BEV stand-in (6 cameras at 128x352) exported and run in both runtimes
def test_default_session_and_reference_agree_on_a_bev_stand_in(tmp_path):
    from examples.bev import scenes
    from examples.bev.train import build

    bevdet = importlib.import_module("examples.bev.bevdet")
    batches = [torch.utils.data.default_collate([scenes.make_sample(seed)]) for seed in (7, 8, 9)]
    model = build("bevdet", "examples/checkpoints/bevdet.pt").eval()
    example = bevdet.inputs(batches[0])
    config = ptqat_fx.QuantConfig(w_bits=8, a_bits=8, w_observer="minmax", a_observer="minmax")
    qmodel = ptqat_fx.quantize(model, example, [example, bevdet.inputs(batches[1])], config, select=None,
                               progress=False).eval()
    ptqat_fx.export_onnx(qmodel, example, tmp_path / "m.onnx")
    x = bevdet.inputs(batches[2])
    with torch.no_grad():
        expected = [t.numpy() for t in ptqat_fx.convert(qmodel, arithmetic="engine")(*x).values()]
    session = _default_session(tmp_path / "m.onnx")
    feeds = dict(zip([i.name for i in session.get_inputs()], (t.numpy() for t in x)))
    step = output_step(qmodel)
    for got_all in (session.run(None, feeds), run_onnx(tmp_path / "m.onnx", x, "reference")):
        for got, want in zip(got_all, expected):
            # Heads are (1, C, H, W) maps: the peak of each class map is the detection.
            found = step_agreement(got.reshape(want.shape[1], -1), want.reshape(want.shape[1], -1), step)
            assert found.within_one_step >= MIN_WITHIN_ONE_STEP and found.argmax_changed == 0.0, found


OPTIMIZATION_LEVELS = (onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL,
                       onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                       onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL)


def test_attention_runs_the_engine_arithmetic_exactly_at_every_optimization_level(tmp_path):
    # The ViT's matmuls of two activations are integer forms too: with extended optimizations
    # onnxruntime would otherwise fuse `DQ, DQ -> MatMul -> Q` into QLinearMatMul, whose
    # combined requantization multiplier rounds differently from float Q/DQ at near-ties.
    qmodel = quantized("vit", 4)
    ptqat_fx.export_onnx(qmodel, (example_input("vit"),), tmp_path / "m.onnx", dynamic_batch=True)
    x = torch.randn((32, *EXAMPLES["vit"][1][1:]), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ptqat_fx.convert(qmodel, arithmetic="engine")(x).numpy()
    runs = {"reference": run_onnx(tmp_path / "m.onnx", (x,), "reference")[0]}
    for level in OPTIMIZATION_LEVELS:
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = level
        session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), options, providers=["CPUExecutionProvider"])
        runs[str(level)] = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    for runtime, got in runs.items():
        assert step_agreement(got, expected, output_step(qmodel)).max_steps == 0.0, runtime
