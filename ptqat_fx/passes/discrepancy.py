"""Discrepancy analysis: how far each layer's quantized output departs from full precision.

One ``fx.Interpreter`` sweep per batch evaluates the float and the quantized model side by
side: every value in the environment is a pair (float, quantized). Quantizer nodes pass the
float value through on the float side and quantize on the quantized side; every other node
runs once per side. At each layer two discrepancies can be read:

* ``accumulated``: the layer's output in the fully quantized model vs in the float model,
  the error that has arrived at that layer;
* ``local``: the layer run on its quantized float input (and quantized weight) vs the float
  layer, the error that layer makes by itself. This needs a third evaluation at layers only.

Layers inside a leaf module (quantized at module level, ``quantize_leaves``) are measured at
module level: the leaf runs once with its layers computing in float and once quantized, and
forward hooks read each layer's output on both sides (``local``: the layer quantized on its
float-side input; it stands in for ``accumulated`` where a value-dependent forward called the
layer with other shapes on the two sides). The leaf's float side is truly float, so layers after it are measured
against a float reference too.

Metrics, per sample (dim 0) then averaged over all samples of all batches:
``euclidean`` ||Q - X||_2 (the PTQAT paper's ``Dis``), ``relative`` ||Q - X|| / ||X||,
``mse`` mean (Q - X)^2, ``cosine`` 1 - cos(Q, X). Results go to ``LayerSpec.discrepancy``
under ``"<mode>.<metric>"``.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate

from ..model_inputs import model_args
from ..config import METRICS, MODES
from ..errors import CalibrationError, ConfigError
from ..layer_spec import LayerSpec, layer_specs
from ..meta import DiscrepancyKey, float_weight, layer_spec
from ..progress import progress_bar
from ..runtime.quantized_modules import float_reference, is_quantized_layer
from ..runtime.quantizer import FakeQuantizer, fake_quantize_forward
from .float_outputs import FloatOutputs, tapped


@dataclass
class _Both:
    """A value on the float side and on the quantized side; ``local`` at quantizer outputs
    is the quantizer applied to the float value."""

    float: Any
    quantized: Any
    local: Any = None

    @property
    def local_or_float(self) -> Any:
        return self.local if self.local is not None else self.float


def _distances(q: torch.Tensor, x: torch.Tensor, metrics: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per-sample values of ``metrics``, shape [samples]; only the reductions they need run,
    over all dims but the first, without copying non-contiguous outputs."""
    q, x = q.detach(), x.detach()
    if q.dim() < 2:
        q, x = q.reshape(-1, 1), x.reshape(-1, 1)
    dims = tuple(range(1, q.dim()))
    features = q[0].numel()
    values: dict[str, torch.Tensor] = {}
    if {"euclidean", "relative", "mse"} & set(metrics):
        difference = torch.linalg.vector_norm(q - x, dim=dims, dtype=torch.float32).double().reshape(-1)
        values["euclidean"] = difference
        if "mse" in metrics:  # two more kernels per layer and batch, on a GPU launches that count
            values["mse"] = difference.square() / features
    if {"relative", "cosine"} & set(metrics):
        x_norm = torch.linalg.vector_norm(x, dim=dims, dtype=torch.float32).double().reshape(-1)
    if "relative" in metrics:
        values["relative"] = difference / x_norm.clamp_min(1e-12)
    if "cosine" in metrics:
        q_norm = torch.linalg.vector_norm(q, dim=dims, dtype=torch.float32).double().reshape(-1)
        dot = (q.float() * x.float()).sum(dim=dims).double().reshape(-1)
        values["cosine"] = 1 - dot / (q_norm * x_norm).clamp_min(1e-12)
    return {metric: values[metric] for metric in metrics}


def _fake_quantize(quantizer: FakeQuantizer, x: torch.Tensor) -> torch.Tensor:
    # The arithmetic alone: no module call or autograd Function on the way (no_grad here).
    return fake_quantize_forward(x, quantizer.scale, quantizer.qmin, quantizer.qmax, quantizer.channel_axis)


class DiscrepancyInterpreter(fx.Interpreter):
    """Runs float and quantized side by side and sums per-layer discrepancies.

    Example::

        interpreter = DiscrepancyInterpreter(gm, modes=("accumulated",))
        for batch in data:
            interpreter.run(*batch)
        interpreter.means()   # {layer name: {"accumulated.relative": ..., ...}}
    """

    def __init__(
        self, gm: fx.GraphModule, modes: Sequence[str] = ("accumulated",), metrics: Sequence[str] = METRICS
    ) -> None:
        super().__init__(gm)
        self.modes = tuple(modes)
        self.metrics = tuple(metrics)
        self.sums: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        self.samples: dict[str, int] = defaultdict(int)
        # Weights do not change during the analysis: quantize each once, not once per batch.
        self.quantized_constants: dict[str, torch.Tensor] = {}
        # Node name -> its FakeQuantizer, looked up once rather than per node per batch.
        self.quantizer_nodes: dict[str, FakeQuantizer] = {
            n.name: gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), FakeQuantizer)
        }
        self.leaf_layers: dict[str, list[nn.Module]] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op in ("placeholder", "get_attr"):
            value = super().run_node(n)
            if float_weight(n) is not None:  # a frozen layer's dequantized weight
                return _Both(self.module.get_parameter(float_weight(n)), value, value)
            return _Both(value, value)
        float_args, float_kwargs = self._side(n, "float")
        if n.name in self.quantizer_nodes:
            # The float side passes the value through: running the quantizer module on it
            # (once per batch, weights included) would only be thrown away.
            quantizer = self.quantizer_nodes[n.name]
            (float_in,), (quantized_in,) = float_args, self._side(n, "quantized")[0]
            if n.args[0].op == "get_attr":
                constant = self.quantized_constant(n.name, quantizer, float_in)
                return _Both(float_in, constant, constant)
            local = _fake_quantize(quantizer, float_in) if "local" in self.modes else None
            return _Both(float_in, _fake_quantize(quantizer, quantized_in), local)
        inside = self._leaf_layers(n)
        if inside:
            return self._run_leaf(n, inside, float_args, float_kwargs)
        # Layers fused with their input quantizers (freeze) name their float form.
        float_target = getattr(n.target, "float_reference", n.target)
        float_out = getattr(self, n.op)(float_target, float_args, float_kwargs)
        if n.op == "output":
            return float_out
        quantized_args, quantized_kwargs = self._side(n, "quantized")
        quantized_out = getattr(self, n.op)(n.target, quantized_args, quantized_kwargs)
        spec: LayerSpec | None = layer_spec(n)
        if spec is not None:
            self._record(n, spec, float_out, quantized_out)
        return _Both(float_out, quantized_out)

    def _leaf_layers(self, n: fx.Node) -> list[nn.Module]:
        """The module-level quantized layers a leaf module call runs (cached by node)."""
        if n.op != "call_module":
            return []
        if n.name not in self.leaf_layers:
            self.leaf_layers[n.name] = [m for m in self.module.get_submodule(n.target).modules() if is_quantized_layer(m)]
        return self.leaf_layers[n.name]

    def _run_leaf(self, n: fx.Node, inside: list[nn.Module], float_args: tuple, float_kwargs: dict) -> _Both:
        """Run a leaf on each side (its layers in float, then quantized) and record every
        layer inside it at module level: its output on the quantized side (and, for
        ``local``, the layer quantized on its float-side input) against the float side."""
        seen: dict[int, dict[str, list[torch.Tensor]]] = {id(m): defaultdict(list) for m in inside}
        side = ["float"]

        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            if not isinstance(out, torch.Tensor):
                return
            seen[id(module)][side[0]].append(out)
            if side[0] == "float":
                # Also the stand-in for "accumulated" where the two sides' calls differ in shape.
                with float_reference([module], on=False):
                    seen[id(module)]["local"].append(type(module).forward(module, *args))

        handles = [m.register_forward_hook(hook) for m in inside]
        try:
            with float_reference(inside):
                float_out = self.call_module(n.target, float_args, float_kwargs)
            side[0] = "quantized"
            with float_reference(inside, on=False):
                quantized_out = self.call_module(n.target, *self._side(n, "quantized"))
        finally:
            for handle in handles:
                handle.remove()
        for module in inside:
            outputs = seen[id(module)]
            quantized = outputs["quantized"]
            for index, float_value in enumerate(outputs["float"]):
                local = outputs["local"][index]
                same = index < len(quantized) and quantized[index].shape == float_value.shape
                by_mode = {"accumulated": quantized[index] if same else local, "local": local}
                self._accumulate(module.layer_spec.name, {m: by_mode[m] for m in self.modes}, float_value)
        return _Both(float_out, quantized_out)

    def _side(self, n: fx.Node, side: str) -> tuple[tuple, dict]:
        def pick(value: Any) -> Any:
            return getattr(self.env[value], side) if isinstance(value, fx.Node) else value

        return map_aggregate(n.args, pick), map_aggregate(n.kwargs, pick)

    def _record(self, n: fx.Node, spec: LayerSpec, float_out: Any, quantized_out: Any) -> None:
        if not isinstance(float_out, torch.Tensor):
            return
        outputs = {}
        reshaped = not isinstance(quantized_out, torch.Tensor) or quantized_out.shape != float_out.shape
        if "local" in self.modes or reshaped:
            # Value-dependent shapes (boolean masks) can differ between the sides: then the
            # layer is measured on its float-side input (local) for accumulated too.
            local_args, local_kwargs = self._side(n, "local_or_float")
            outputs["local"] = getattr(self, n.op)(n.target, local_args, local_kwargs)
        if "accumulated" in self.modes:
            outputs["accumulated"] = outputs["local"] if reshaped else quantized_out
        self._accumulate(spec.name, {mode: outputs[mode] for mode in self.modes}, float_out)

    def _accumulate(self, name: str, outputs: dict[str, torch.Tensor], float_out: torch.Tensor) -> None:
        self.add(name, self.measure(outputs, float_out))

    def measure(self, outputs: dict[str, torch.Tensor], float_out: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
        """Per ``"<mode>.<metric>"`` the sum over samples of ``outputs`` (by mode) against
        ``float_out``, and the number of samples."""
        totals = {
            str(DiscrepancyKey(mode, metric)): values.sum()
            for mode, output in outputs.items()
            for metric, values in _distances(output, float_out, self.metrics).items()
        }
        return totals, float_out.shape[0] if float_out.dim() > 0 else 1

    def add(self, name: str, measured: tuple[dict[str, torch.Tensor], int]) -> None:
        """Add one ``measure`` of layer ``name`` to its sums."""
        totals, samples = measured
        sums = self.sums[name]
        for key, total in totals.items():
            sums[key] = sums[key] + total if key in sums else total
        self.samples[name] += samples

    def quantized_constant(self, name: str, quantizer: FakeQuantizer, weight: torch.Tensor) -> torch.Tensor:
        """The fake-quantized weight of quantizer node ``name``, computed once."""
        if name not in self.quantized_constants:
            self.quantized_constants[name] = _fake_quantize(quantizer, weight)
        return self.quantized_constants[name]

    def means(self) -> dict[str, dict[str, float]]:
        """Layer name -> ``"<mode>.<metric>"`` -> mean over all samples seen."""
        entries = [(name, key, total) for name, sums in self.sums.items() for key, total in sums.items()]
        # One read-back per device for all the sums, not one per layer and metric.
        by_device: dict[torch.device, list[int]] = {}
        for index, (_, _, total) in enumerate(entries):
            by_device.setdefault(total.device, []).append(index)
        values: dict[int, float] = {}
        for indices in by_device.values():
            values.update(zip(indices, torch.stack([entries[i][2].reshape(()) for i in indices]).tolist()))
        means: dict[str, dict[str, float]] = {name: {} for name in self.sums}
        for index, (name, key, _) in enumerate(entries):
            means[name][key] = values[index] / self.samples[name]
        return means


class _Reshaped(Exception):
    """A layer's output has another shape on the quantized side than on the float side."""


def _sweepable(gm: fx.GraphModule, modes: Sequence[str]) -> bool:
    """Whether ``QuantizedSweep`` measures what the interpreter would: ``accumulated`` only,
    no layer quantized at module level inside a leaf, no frozen or fused layer (whose float
    side is not calibration's forward)."""
    if tuple(modes) != ("accumulated",) or any(is_quantized_layer(m) for m in gm.modules()):
        return False
    return not any(float_weight(n) is not None or hasattr(n.target, "float_reference") for n in gm.graph.nodes)


class QuantizedSweep:
    """The quantized side alone, run as the graph's generated forward (``tapped``), measured
    against the float layer outputs calibration recorded (``FloatOutputs``): the same
    quantizer arithmetic and the same sums as ``DiscrepancyInterpreter``, into its sums."""

    def __init__(self, interpreter: DiscrepancyInterpreter) -> None:
        self.interpreter = interpreter
        gm = interpreter.module
        self.specs = {n.name: layer_spec(n) for n in gm.graph.nodes if layer_spec(n) is not None}
        replace: dict[str, Any] = {}
        for node in gm.graph.nodes:
            quantizer = interpreter.quantizer_nodes.get(node.name)
            if quantizer is not None:
                is_weight = node.args[0].op == "get_attr"
                replace[node.name] = self._weight(node, quantizer) if is_weight else _quantizing(quantizer)
        self.forward = tapped(gm, self._compare, replace)
        self.float_outputs: dict[str, torch.Tensor | None] = {}
        self.pending: list[tuple[str, tuple[dict[str, torch.Tensor], int]]] = []

    def _weight(self, node: fx.Node, quantizer: FakeQuantizer) -> Any:
        weight = self.interpreter.fetch_attr(node.args[0].target)
        self.interpreter.quantized_constant(node.name, quantizer, weight)
        constants, name = self.interpreter.quantized_constants, node.name

        def quantized_weight(weight: torch.Tensor) -> torch.Tensor:
            # Looked up, not captured: ``release`` frees the constants.
            return constants[name]

        return quantized_weight

    def run(self, args: tuple, float_outputs: dict[str, torch.Tensor | None]) -> bool:
        """Measure one batch; False (nothing added) where a layer's shape differs between the
        sides, which the interpreter measures on the float-side input instead."""
        self.float_outputs, self.pending = float_outputs, []
        try:
            self.forward(*args)
        except _Reshaped:
            return False
        for name, measured in self.pending:
            self.interpreter.add(name, measured)
        return True

    def release(self) -> None:
        """Drop the batch's float outputs and the quantized weights. The tapped forward is a
        reference cycle (as every GraphModule is) that holds this sweep: without this they
        would stay on the model's device until Python's next full collection."""
        self.float_outputs, self.pending = {}, []
        self.interpreter.quantized_constants.clear()

    def _compare(self, node_name: str, value: Any) -> None:
        float_out = self.float_outputs.get(node_name)
        if not isinstance(float_out, torch.Tensor):
            return
        if not isinstance(value, torch.Tensor) or value.shape != float_out.shape:
            raise _Reshaped(node_name)
        measured = self.interpreter.measure({"accumulated": value}, float_out)
        self.pending.append((self.specs[node_name].name, measured))


def _quantizing(quantizer: FakeQuantizer) -> Any:
    def fake_quantize(x: torch.Tensor) -> torch.Tensor:
        return _fake_quantize(quantizer, x)

    return fake_quantize


def discrepancy(
    gm: fx.GraphModule,
    data: Iterable[Any],
    arity: int,
    *,
    modes: Sequence[str] = ("accumulated",),
    metrics: Sequence[str] = METRICS,
    progress: bool = True,
    reference: FloatOutputs | None = None,
) -> fx.GraphModule:
    """Measure every annotated layer's discrepancy over ``data``; returns ``gm``.

    Args:
        gm: a calibrated fake-quant graph.
        data: batches of model inputs (as for calibration).
        arity: number of positional model inputs.
        modes: any of ``local`` and ``accumulated``.
        metrics: any of ``euclidean``, ``relative``, ``mse``, ``cosine`` (all by default;
            ``quantize`` measures only the one its selection ranks by).
        progress: show a progress bar.
        reference: the float layer outputs ``calibrate(gm, ..., record=reference)`` kept:
            a batch equal to a recorded one runs only the quantized side (``QuantizedSweep``,
            same results); the others, and ``local`` mode, run both sides.

    Fills ``LayerSpec.discrepancy["<mode>.<metric>"]`` for every layer and metric.
    """
    unknown = set(modes) - set(MODES)
    if unknown or not modes:
        raise ConfigError(f"discrepancy modes={tuple(modes)!r}: choose from {MODES}")
    if set(metrics) - set(METRICS) or not metrics:
        raise ConfigError(f"discrepancy metrics={tuple(metrics)!r}: choose from {METRICS}")
    for name, module in gm.named_modules():
        if isinstance(module, FakeQuantizer) and not module.calibrated:
            raise CalibrationError(f"quantizer {name!r} is not calibrated; run calibrate() first")
    interpreter = DiscrepancyInterpreter(gm, modes, metrics)
    usable = reference is not None and reference.valid_for(gm) and _sweepable(gm, modes)
    sweep = QuantizedSweep(interpreter) if usable else None
    was_training = gm.training
    gm.eval()
    batches = 0
    try:
        with torch.no_grad():
            for index, batch in enumerate(progress_bar(data, "discrepancy", progress)):
                args = model_args(batch, arity)
                recorded = reference.outputs(index, args) if sweep is not None else None
                if recorded is None or not sweep.run(args, recorded):
                    interpreter.run(*args)
                batches += 1
    finally:
        gm.train(was_training)
        if sweep is not None:
            sweep.release()
    if batches == 0:
        raise CalibrationError("discrepancy data yielded no batch")
    means = interpreter.means()
    interpreter.sums.clear()  # a sweep's reference cycle may still hold the interpreter
    for spec in layer_specs(gm):
        spec.discrepancy.update(means.get(spec.name, {}))
    return gm


def discrepancy_table(gm: fx.GraphModule, key: str = "accumulated.relative") -> list[dict[str, Any]]:
    """Rows ``{layer, kind, params, value}`` in graph order for one ``"<mode>.<metric>"``."""
    mode, _, metric = key.partition(".")
    if mode not in MODES or metric not in METRICS:
        raise ConfigError(f"discrepancy key {key!r}: expected '<mode>.<metric>' with mode in {MODES}, metric in {METRICS}")
    return [
        {"layer": s.name, "kind": s.kind, "params": s.params, "value": s.discrepancy.get(key)}
        for s in layer_specs(gm)
    ]
