"""Every public stage on one zoo model, each checked against the eager model, each failure
recorded instead of raised: ``run_stages(case) -> StageRow``.

The references are independent of ptqat_fx's own tables: the conv/linear layers that ran are
found by forward hooks on the eager model (``isinstance``, so subclasses count), the matmuls
by a ``TorchFunctionMode`` counting matmul calls of two non-parameter tensors. Stages:

1. W8A8 (min-max observers, no selection): error ``||q - fp|| / ||fp - mean(fp)||`` on a
   held-out batch, the worst over the output's float tensors; which layers got quantizers.
2. W4A8 with PTQAT's selection, then ``finetune`` for two steps: selected weights change,
   parameters without gradients do not, BatchNorm statistics of BNs with frozen affine
   parameters do not (frozen parts must behave as in eval).
3. ``convert`` of the fine-tuned model against its fake-quant output in eval.
4. ``export_onnx`` in a default onnxruntime session against ``convert(arithmetic="engine")``,
   the arithmetic an integer engine runs (integer accumulation, int32 biases).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

import ptqat_fx
from ptqat_fx import QuantConfig
from ptqat_fx.coverage import coverage
from ptqat_fx.layer_spec import layer_specs
from ptqat_fx.runtime.quantizer import FakeQuantizer
from ptqat_fx.capture import AUTO_LEAVES_KEY

from .cases import Case

LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
_MATMULS = {torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.bmm,
            torch.baddbmm, torch.einsum}
# Acceptance lines of issue 12: quantized share of called conv/linear, W8A8 error, and the
# agreement of convert and ONNX with fake-quant.
MIN_SHARE, MAX_W8A8, MAX_DEPLOY = 0.95, 0.05, 1e-2
LINES = ("coverage", "w8a8", "finetune", "convert", "onnx")
STAGE_SECONDS = 150  # per stage; a stage past it is recorded as a TimeoutError


@dataclass
class StageRow:
    """What ``run_stages`` found for one model; ``errors`` maps a stage to ``Type: first line``."""

    name: str
    family: str
    capture: str = "-"
    auto_leaves: list[dict[str, Any]] = field(default_factory=list)  # path, error, line, float_layers
    called_layers: int = 0
    quantized_called: int = 0
    float_called: list[str] = field(default_factory=list)
    called_matmuls: int = 0
    quantized_matmuls: int = 0
    report_layers: int | None = None
    coverage_layers: int | None = None
    w8a8_error: float | None = None
    selected: int | None = None
    selected_changed: int | None = None
    selected_unchanged: list[str] = field(default_factory=list)
    selected_no_gradient: int | None = None  # among the unchanged
    frozen_changed: int | None = None
    frozen_bn_changed: int | None = None
    convert_error: float | None = None
    onnx_error: float | None = None
    model_unchanged: bool | None = None
    seconds: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def quantized_share(self) -> float:
        return self.quantized_called / self.called_layers if self.called_layers else 0.0

    @property
    def trains(self) -> bool:
        # A selected weight may stay put only where its gradient is exactly zero (a dead
        # ReLU path at random init); one that had a gradient and did not move is a failure.
        return bool(self.selected_changed) and self.selected_changed + self.selected_no_gradient == self.selected \
            and self.frozen_changed == 0 and self.frozen_bn_changed == 0

    def asdict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"quantized_share": self.quantized_share, "trains": self.trains}


def passes(row: dict[str, Any]) -> dict[str, bool]:
    """The acceptance lines (``LINES``) one row (``StageRow.asdict()``) meets."""
    return {
        "coverage": row["called_layers"] > 0 and row["quantized_share"] >= MIN_SHARE,
        "w8a8": row["w8a8_error"] is not None and row["w8a8_error"] < MAX_W8A8,
        "finetune": row["trains"],
        "convert": row["convert_error"] is not None and row["convert_error"] < MAX_DEPLOY,
        "onnx": row["onnx_error"] is not None and row["onnx_error"] < MAX_DEPLOY,
    }


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout(f"stage ran past {STAGE_SECONDS} s")


def _stage(row: StageRow, name: str, run: Callable[[], Any]) -> Any:
    """``run()``, or None with the failure recorded under ``name``."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(STAGE_SECONDS)
    try:
        return run()
    except Exception as error:  # every failure is a result here
        first = (str(error).strip().splitlines() or [""])[0][:300]
        row.errors[name] = f"{type(error).__name__}: {first}"
        return None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class _CountMatmuls(TorchFunctionMode):
    """Counts matmul calls whose operands are activations (no parameter among them)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        operands = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if func in _MATMULS and len(operands) >= 2 and not any(isinstance(a, nn.Parameter) for a in operands):
            self.count += 1
        elif func is F.scaled_dot_product_attention:
            self.count += 2  # q @ k^T and attn @ v
        return func(*args, **kwargs)


def layer_types() -> tuple[type[nn.Module], ...]:
    """``LAYER_TYPES``, and transformers' ``Conv1D`` (GPT-2's linear layers, weight ``[in, out]``)
    where transformers is imported (a model holding one has imported it)."""
    if "transformers" not in sys.modules:
        return LAYER_TYPES
    from transformers.pytorch_utils import Conv1D

    return (*LAYER_TYPES, Conv1D)


def called_layers(model: nn.Module, inputs: tuple) -> tuple[list[str], int]:
    """Paths of the Conv/ConvTranspose/Linear/Conv1D modules (by isinstance) that run on
    ``inputs``, and the number of activation matmuls, from the eager model."""
    ran: list[str] = []
    types = layer_types()
    handles = [module.register_forward_hook(lambda *_, path=path: ran.append(path))
               for path, module in model.named_modules() if isinstance(module, types)]
    counter = _CountMatmuls()
    try:
        with torch.no_grad(), counter:
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(ran)), counter.count


def _quantized_paths(gm: fx.GraphModule) -> set[str]:
    """Module paths with a weight FakeQuantizer or a LayerSpec; a root auto-leaf's ``model.``
    prefix removed so that paths match the user's model."""
    paths = {path.rpartition(".")[0] for path, m in gm.named_modules()
             if path.endswith("weight_fake_quant") and isinstance(m, FakeQuantizer)}
    paths |= {spec.module_path for spec in layer_specs(gm) if spec.module_path and spec.weight_quantizer}
    return paths | {path[len("model."):] for path in paths if path.startswith("model.")}


def capture_mode(gm: fx.GraphModule) -> str:
    """whole / nested(N graphs) / auto-leaf(root or N), from what quantize recorded."""
    recorded = gm.meta.get("ptqat_capture_mode")
    if recorded is not None:
        return str(recorded)
    nested = sum(isinstance(m, fx.GraphModule) for path, m in gm.named_modules() if path)
    leaves = [leaf.path for leaf in gm.meta.get(AUTO_LEAVES_KEY, [])]
    if "model" in leaves:
        return "auto-leaf(root)"
    parts = (["nested(%d)" % nested] if nested else []) + (["auto-leaf(%d)" % len(leaves)] if leaves else [])
    return "+".join(parts) or "whole"


def _float_leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def output_error(out: Any, ref: Any) -> float:
    """The worst over the output's float tensors of ``||out - ref|| / ||ref - mean(ref)||``;
    NaN where no output tensor has a spread (a constant reference measures nothing)."""
    outs, refs = _float_leaves(out), _float_leaves(ref)
    if len(outs) != len(refs) or any(o.shape != r.shape for o, r in zip(outs, refs)):
        raise ValueError(f"output structure differs: {[tuple(o.shape) for o in outs]} vs {[tuple(r.shape) for r in refs]}")
    errors = [((o.double() - r.double()).norm() / spread).item() for o, r in zip(outs, refs)
              for spread in [(r.double() - r.double().mean()).norm()] if r.numel() > 1 and spread > 0]
    return max(errors, default=float("nan"))


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}


def _scale_free_loss(out: Any, batch: Any) -> torch.Tensor:
    """Mean square of every float output over its own (detached) mean square: gradients of
    order one whatever the output scale (random-init outputs can be ~1e-10, whose plain MSE
    gradient moves no float32 weight), and defined for detection outputs (variable boxes),
    which no teacher output matches. Empty tensors (no detections) are left out: their mean
    is NaN; an output with nothing else has nothing to train on, which is an error."""
    terms = [t.float().pow(2).mean() / t.detach().float().pow(2).mean().clamp_min(1e-30)
             for t in _float_leaves(out) if t.requires_grad and t.numel() > 0]
    if not terms:
        raise ValueError("every float output that requires grad is empty: no loss to train on")
    return sum(terms)


def _parameter_name(gm: fx.GraphModule, path: str | None, names: dict[int, str]) -> str | None:
    """The name ``named_parameters`` gives the parameter at ``path``: a tied weight
    (``lm_head.weight`` is ``wte.weight``) is listed once, under its first path."""
    try:
        return names.get(id(gm.get_parameter(path))) if path else None
    except AttributeError:
        return None


def _finetune(row: StageRow, gm: fx.GraphModule, batches: list[tuple]) -> None:
    params = dict(gm.named_parameters())
    names = {id(p): n for n, p in params.items()}
    selected = [name for spec in layer_specs(gm) if spec.selected
                for name in [_parameter_name(gm, spec.weight, names)] if name is not None]
    frozen = [n for n, p in params.items() if not p.requires_grad]
    bns = [m for m in gm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
           and not any(p.requires_grad for p in m.parameters())]
    before = {n: p.detach().clone() for n, p in params.items()}
    bn_before = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    ptqat_fx.finetune(gm, batches, loss=_scale_free_loss, loss_takes="batch", steps=2, lr=1e-3, progress=False)
    row.selected = len(selected)
    row.selected_changed = sum(not torch.equal(before[n], params[n]) for n in selected)
    # The last step's gradients are still there (finetune zeroes them before each backward).
    row.selected_unchanged = [n for n in selected if torch.equal(before[n], params[n])]
    row.selected_no_gradient = sum(params[n].grad is None or not params[n].grad.any() for n in row.selected_unchanged)
    row.frozen_changed = sum(not torch.equal(before[n], params[n]) for n in frozen)
    row.frozen_bn_changed = sum(not (torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var))
                                for m, (mean, var) in zip(bns, bn_before))


def _onnx_error(gm: fx.GraphModule, inputs: tuple) -> float:
    import onnxruntime

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        ptqat_fx.export_onnx(gm, inputs, path)
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        feeds = [t.numpy() for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
        names = [i.name for i in session.get_inputs()]
        got = [torch.from_numpy(o) for o in session.run(None, dict(zip(names, feeds)))]
    with torch.no_grad():
        ref = _float_leaves(ptqat_fx.convert(gm, arithmetic="engine")(*inputs))
    return output_error([g for g in got if g.is_floating_point()], ref)


def run_stages(case: Case) -> StageRow:
    """All stages on ``case``; a failing stage is recorded in ``row.errors`` and skips the
    stages that need its result."""
    start = time.perf_counter()
    row = StageRow(case.name, case.family)
    torch.manual_seed(0)
    model = _stage(row, "build", case.build)
    if model is None:
        return row
    before, types_before = _state(model), [type(m) for m in model.modules()]
    example, test = case.inputs(0), case.inputs(100)
    calib = [case.inputs(seed) for seed in (1, 2)]
    found = _stage(row, "eager", lambda: called_layers(model, example))
    if found is not None:
        row.called_layers, row.called_matmuls = len(found[0]), found[1]
        row.float_called = found[0]  # until quantize says otherwise
    with torch.no_grad():
        reference = model(*test)
    config8 = QuantConfig(w_bits=8, a_bits=8, w_observer="minmax", a_observer="minmax")
    gm8 = _stage(row, "quantize_w8a8", lambda: ptqat_fx.quantize(model, example, calib, config8, select=None,
                                                                  progress=False))
    if gm8 is not None:
        row.capture = capture_mode(gm8)
        row.auto_leaves = [{"path": leaf.path, "error": leaf.error[:300], "line": leaf.line,
                            "float_layers": list(leaf.float_layers)} for leaf in gm8.meta.get(AUTO_LEAVES_KEY, [])]
        row.coverage_layers = coverage(gm8).layers
        row.report_layers = _stage(row, "report", lambda: len(ptqat_fx.report(gm8).rows))
        row.quantized_matmuls = sum(spec.kind == "matmul" and bool(spec.input_quantizers) for spec in layer_specs(gm8))
        if found is not None:
            quantized = _quantized_paths(gm8)
            row.float_called = [path for path in found[0] if path not in quantized]
            row.quantized_called = row.called_layers - len(row.float_called)

        def error8() -> float:
            with torch.no_grad():
                return output_error(gm8.eval()(*test), reference)

        row.w8a8_error = _stage(row, "w8a8_error", error8)
    gm4 = _stage(row, "quantize_w4a8", lambda: ptqat_fx.quantize(model, example, calib, progress=False))
    if gm4 is not None:
        _stage(row, "finetune", lambda: _finetune(row, gm4, calib))

        def convert_error() -> float:
            with torch.no_grad():
                fake = gm4.eval()(*test)
                return output_error(ptqat_fx.convert(gm4)(*test), fake)

        row.convert_error = _stage(row, "convert", convert_error)
        row.onnx_error = _stage(row, "onnx", lambda: _onnx_error(gm4, example))
    after = model.state_dict(keep_vars=True)
    row.model_unchanged = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before) \
        and types_before == [type(m) for m in model.modules()]
    row.seconds = time.perf_counter() - start
    return row


def thirdparty_cases() -> list[Case]:
    """The third-party zoo as ``Case`` objects."""
    from .thirdparty import thirdparty_zoo

    return [Case(name, family, build, inputs) for name, (family, build, inputs) in thirdparty_zoo().items()]


def all_cases() -> list[Case]:
    """The idiom models and torchvision classifiers of ``cases()``, then the third-party zoo."""
    from .cases import cases

    return cases() + thirdparty_cases()

