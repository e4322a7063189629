"""Check an exported ONNX model against the PyTorch model it came from, in onnxruntime (CPU)
and in ``onnx.reference``.

The export is written so that a default ``onnxruntime.InferenceSession`` (every graph
optimization on) computes what ``convert(qmodel, arithmetic="engine")`` computes: biases are
already int32 DequantizeLinear (so ``WeightBiasQuantization`` has nothing to re-quantize) and
signed activations are UINT8 with zero point 128 (so ``QDQS8ToU8Transformer`` has nothing to
rewrite, and the fusions after it load). One optimization is still wrong for 4-bit activations:

* ``ReluQuantRewrite`` drops a ReLU before a 4-bit QuantizeLinear as if the quantizer clipped
  negatives; ours does not, so outputs move by up to ~0.5. ``onnxruntime_session`` disables it.

Agreement is not bit-identical: float kernels accumulate in another order than torch, and where
an activation lands within float rounding of a ``k + 0.5`` boundary the two round differently;
such a flip moves the outputs it reaches by a few output steps. ``agreement`` reports the
largest error and the share of outputs that differ at all; ``step_agreement`` measures in
output steps (the bound docs/deploy.md states).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime
import torch
from onnx.reference import ReferenceEvaluator
from torch import fx, nn

from ..layer_spec import layer_nodes
from ..meta import layer_spec

ORT_DISABLED_OPTIMIZERS = ("ReluQuantRewrite",)
RUNTIMES = ("onnxruntime", "reference")
# Outputs closer than this are counted as agreeing (float32 accumulation-order noise).
EXACT_ATOL = 1e-5


@dataclass(frozen=True)
class Agreement:
    """How one runtime's outputs compare with the PyTorch model's.

    Attributes:
        max_abs_error: largest |onnx - torch| over all outputs.
        mismatched_fraction: share of output elements differing by more than ``EXACT_ATOL``
            (rounding flips; see the module docstring).
    """

    max_abs_error: float
    mismatched_fraction: float


def onnxruntime_session(path: str | os.PathLike) -> onnxruntime.InferenceSession:
    """A CPU session for ``path`` with ``ReluQuantRewrite`` (wrong for 4-bit activations)
    disabled; for 8-bit activations it computes what a default session computes."""
    return onnxruntime.InferenceSession(
        os.fspath(path), providers=["CPUExecutionProvider"], disabled_optimizers=list(ORT_DISABLED_OPTIMIZERS)
    )


def run_onnx(path: str | os.PathLike, inputs: tuple[torch.Tensor, ...], runtime: str) -> list[np.ndarray]:
    """The outputs of the ONNX model at ``path`` on ``inputs``, in ``runtime`` (one of
    ``RUNTIMES``)."""
    feeds_of = lambda names: dict(zip(names, (t.detach().cpu().numpy() for t in inputs)))
    if runtime == "onnxruntime":
        session = onnxruntime_session(path)
        return session.run(None, feeds_of([i.name for i in session.get_inputs()]))
    if runtime == "reference":
        model = onnx.load(os.fspath(path))
        return ReferenceEvaluator(model).run(None, feeds_of([i.name for i in model.graph.input]))
    raise ValueError(f"runtime={runtime!r}: choose one of {RUNTIMES}")


def agreement(
    path: str | os.PathLike, model: nn.Module, inputs: tuple[torch.Tensor, ...]
) -> dict[str, Agreement]:
    """Run the ONNX model at ``path`` in every runtime and ``model`` (eval, no grad) on
    ``inputs``; returns runtime name -> ``Agreement``."""
    with torch.no_grad():
        expected = model.eval()(*inputs)
    expected = [t.cpu().numpy() for t in (expected if isinstance(expected, (tuple, list)) else (expected,))]
    result = {}
    for runtime in RUNTIMES:
        errors = np.concatenate(
            [np.abs(got - want).ravel() for got, want in zip(run_onnx(path, inputs, runtime), expected)]
        )
        result[runtime] = Agreement(float(errors.max()), float((errors > EXACT_ATOL).mean()))
    return result


@dataclass(frozen=True)
class Divergence:
    """The first QuantizeLinear (in graph order) whose integers differ between onnxruntime
    (all graph optimizations off) and ``onnx.reference``.

    Attributes:
        node: the QuantizeLinear node's name.
        flipped: how many of its integers differ.
        ties: ``x / scale`` of the first flipped element in each runtime (onnxruntime,
            reference); a float-accumulation rounding flip shows two values on either side
            of one ``k + 0.5``.
    """

    node: str
    flipped: int
    ties: tuple[float, float]


def first_divergence(path: str | os.PathLike, inputs: tuple[torch.Tensor, ...]) -> Divergence | None:
    """Where the two runtimes first round an activation differently, or None when every
    quantized activation agrees: the tool that separates a semantic difference (many
    integers off, values far from a tie) from a float rounding flip that a deep network
    then amplifies (one integer off, both values within ~1e-5 of ``k + 0.5``)."""
    model = onnx.load(os.fspath(path))
    initializers = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    quantize = [node for node in model.graph.node if node.op_type == "QuantizeLinear"]
    for node in quantize:
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in (node.input[0], node.output[0]))
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = dict(zip([i.name for i in session.get_inputs()], (t.detach().cpu().numpy() for t in inputs)))
    names = [o.name for o in session.get_outputs()]
    engine = dict(zip(names, session.run(None, feeds)))
    reference = dict(zip(names, ReferenceEvaluator(model).run(None, feeds)))
    for node in quantize:
        flips = engine[node.output[0]].astype(np.int64) != reference[node.output[0]].astype(np.int64)
        if flips.any():
            first = int(np.flatnonzero(flips)[0])
            scale = float(initializers[node.input[1]])
            ties = tuple(float(run[node.input[0]].flat[first]) / scale for run in (engine, reference))
            return Divergence(node.name, int(flips.sum()), ties)
    return None


@dataclass(frozen=True)
class StepAgreement:
    """Outputs of an engine against a reference, in output steps.

    Attributes:
        max_steps: largest |engine - reference| / step.
        within_one_step: share of output elements at most one step apart.
        argmax_changed: share of rows (last axis) whose argmax differs.
    """

    max_steps: float
    within_one_step: float
    argmax_changed: float


def output_step(qmodel: fx.GraphModule) -> float:
    """How far one rounding flip at the last layer's input can move an output:
    ``s_in * max|W|`` of the last quantized layer (the unit of the stated agreement bound)."""
    spec = layer_spec(layer_nodes(qmodel)[-1])
    scale = qmodel.get_submodule(spec.input_quantizers[0]).scale.detach()
    return float(scale) * float(qmodel.get_parameter(spec.weight).detach().abs().max())


def step_agreement(engine: np.ndarray, reference: np.ndarray, step: float) -> StepAgreement:
    """How ``engine`` outputs agree with ``reference`` outputs (same shape) in units of ``step``."""
    steps = np.abs(np.asarray(engine, np.float64) - np.asarray(reference, np.float64)) / step
    changed = np.asarray(engine).argmax(-1) != np.asarray(reference).argmax(-1)
    return StepAgreement(float(steps.max()), float((steps <= 1).mean()), float(changed.mean()))
