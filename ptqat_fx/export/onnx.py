"""Export a calibrated fake-quant graph to ONNX with QuantizeLinear/DequantizeLinear.

torch's ONNX exporters refuse 4-bit ranges (and know nothing of our LSQ quantizer), so the
quantizers are exported as markers and lowered here:

1. every quantizer node of a copy of the graph becomes ``torch.ops.ptqat_fx.qdq(x, index)``,
   a custom op whose ONNX translation is a ``ptqat_fx::QDQ(index)`` node; ``index`` points
   into a table of what that quantizer stores (``IntegerWeight`` from ``convert`` for
   weights, the step and range for activations);
2. ``torch.onnx.export(dynamo=True)`` exports the float graph around the markers;
3. a post-pass on the ONNX graph replaces each marker: a weight marker by an INT8 (or INT4)
   initializer -> per-channel ``DequantizeLinear`` on the weight's own layout (``axis`` 0
   for conv and linear weights, 1 for transposed conv), so whatever the exporter did with
   the weight afterwards (``Gemm transB``, a ``Transpose``) still sees the same values; an
   activation marker by ``QuantizeLinear -> DequantizeLinear`` with a scalar scale and zero
   point 0 (INT8, or UINT8 for unsigned ranges).

The marker (``export.markers``) is the only contract with the exporter (a custom op with a translation table),
which holds from torch 2.6 on. The result passes ``onnx.checker.check_model(full_check=True)``.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import fx

from ..checks import require_quantized_float32
from ..dead_code import eliminate_dead_code
from ..errors import InputError
from ..meta import SPECIALIZATION_KEY
from ..layer_spec import layer_nodes, layer_specs
from ..lowering import (
    IntegerLayer, IntegerWeight, bias_argument, deployable_layers, integer_form, integer_layer, integer_matmul,
    integer_matmul_form, integer_weight, pack_int4, set_buffer,
)
from ..leaf_lowering import require_lowerable
from ..runtime.quantizer import FakeQuantizer, is_quantizer_node
from ..views.deploy_report import attach, deploy_report
from . import tensorrt_rules
from .data_dependent import is_data_dependent, specialised_program
from .fragile_clips import relu_for_fragile_clips
from .markers import DOMAIN, ActivationQuant, Entry, Unscaled, mark_leaves, translation_table

DEFAULT_OPSET = 21
INT4_OPSET = 21
# Per-axis DequantizeLinear arrived in opset 13.
MIN_OPSET = 13

def _onnx_type(bits: int, signed: bool) -> int:
    if bits <= 4:
        return TensorProto.INT4 if signed else TensorProto.UINT4
    return TensorProto.INT8 if signed else TensorProto.UINT8


def integer_initializer(name: str, values: torch.Tensor, data_type: int) -> TensorProto:
    """An INT8/UINT8/INT4/UINT4 initializer in ``raw_data``: one byte per 8-bit value, two
    4-bit values per byte (element 2i in the low nibble, as the ONNX spec packs them), so a
    4-bit weight costs 0.5 byte (``int32_data`` would spend a varint on each)."""
    tensor = TensorProto(name=name, data_type=data_type, dims=list(values.shape))
    if data_type in (TensorProto.INT4, TensorProto.UINT4):
        tensor.raw_data = pack_int4(values).numpy().tobytes()
    else:
        tensor.raw_data = values.numpy().astype(np.int8 if data_type == TensorProto.INT8 else np.uint8).tobytes()
    return tensor


def _check_opset(table: list[Entry], opset: int) -> None:
    if opset < MIN_OPSET:
        raise InputError(f"opset={opset}: per-channel DequantizeLinear needs opset >= {MIN_OPSET}")
    for entry in table:
        base = entry.entry if isinstance(entry, Unscaled) else entry
        if isinstance(base, ActivationQuant) and base.bits not in (4, 8):
            raise InputError(
                f"activation quantizer {entry.path!r} has {entry.bits} bits; ONNX Q/DQ export "
                "supports 8-bit (and 4-bit) activations; quantize with a_bits=8"
            )
        if entry.bits <= 4 and opset < INT4_OPSET:
            raise InputError(
                f"opset={opset} cannot hold {entry.path!r} ({entry.bits} bits): INT4 "
                f"QuantizeLinear/DequantizeLinear need opset >= {INT4_OPSET}; pass opset={INT4_OPSET} "
                "(or None)"
            )


def _marker(gm: fx.GraphModule, table: list[Entry], source: fx.Node, entry: Entry) -> fx.Node:
    """A marker node for ``entry`` on ``source``, inserted at the graph's insertion point."""
    table.append(entry)
    return gm.graph.call_function(torch.ops.ptqat_fx.qdq.default, (source, len(table) - 1))


def _activation_entry(gm: fx.GraphModule, node: fx.Node) -> ActivationQuant:
    quantizer: FakeQuantizer = gm.get_submodule(node.target)
    return ActivationQuant(node.target, float(quantizer.scale.detach().reshape(())), quantizer.bits, quantizer.signed)


def _integer_layer(gm: fx.GraphModule, table: list[Entry], layer: IntegerLayer) -> fx.Node:
    """``layer`` as ``integer_form``: Q -> DequantizeLinear(scale 1) on the input, the integer
    weight through DequantizeLinear(scale 1), then ``* s_x s_w`` and the dequantized int32 bias
    (a float initializer holding exactly ``float(int32) * s_x s_w``; the layer itself then has
    no bias for an engine to re-quantize)."""
    node, weight_node = layer.node, layer.node.args[1]
    with gm.graph.inserting_before(node):
        integers = _marker(gm, table, layer.source.args[0], Unscaled(_activation_entry(gm, layer.source)))
        source = weight_node if weight_node.op == "get_attr" else weight_node.args[0]
        weight = _marker(gm, table, source, Unscaled(layer.weight))
        bias = None
        if layer.bias is not None:
            path = f"{layer.bias.path}_engine_{len(table)}"
            set_buffer(gm, path, layer.bias.dequantized())
            bias = gm.graph.get_attr(path)
    integer_form(gm, layer, integers, weight, bias)
    return source  # the weight node the integer marker now reads


def marker_graph(qmodel: fx.GraphModule, integer_layers: bool = True) -> tuple[fx.GraphModule, list[Entry]]:
    """A copy of ``qmodel`` whose quantizers are ``torch.ops.ptqat_fx.qdq`` markers, and the
    table the markers' indices point into. With ``integer_layers``, conv/linear layers between
    a quantized input and a quantized weight take the integer form of ``lowering.integer_layer``,
    matmuls of two quantized activations that of ``lowering.integer_matmul`` (what
    ``convert(..., arithmetic="engine")`` computes): the same accumulator in every runtime. Without, every layer keeps the standard DQ -> layer pattern (TensorRT fuses that
    pattern into its own integer kernels and would not recognise the integer form)."""
    require_lowerable(qmodel)
    gm = deployable_layers(copy.deepcopy(qmodel))
    table: list[Entry] = []
    mark_leaves(gm, table, integer_layers)
    layers = [layer for node in layer_nodes(gm) if integer_layers and (layer := integer_layer(gm, node)) is not None]
    # A frozen weight is a get_attr the integer marker reads directly: unless something else
    # reads it too, it must not get a scaled marker of its own as well.
    products = [
        product for node in layer_nodes(gm) if integer_layers and (product := integer_matmul(gm, node)) is not None
    ]
    taken = {_integer_layer(gm, table, layer) for layer in layers}
    for product in products:
        with gm.graph.inserting_before(product.node):
            first, second = (
                _marker(gm, table, source.args[0], Unscaled(_activation_entry(gm, source))) for source in product.sources
            )
        integer_matmul_form(gm, product, first, second)
    for node in list(gm.graph.nodes):
        if node in taken and all(user.target is torch.ops.ptqat_fx.qdq.default for user in node.users):
            continue
        if (is_quantizer_node(gm, node) or integer_weight(gm, node) is not None) and not node.users:
            gm.graph.erase_node(node)  # an integer layer took over its only use
            continue
        entry: IntegerWeight | ActivationQuant | None = integer_weight(gm, node)
        if entry is None and is_quantizer_node(gm, node):
            entry = _activation_entry(gm, node)
        if entry is None:
            continue
        # A frozen weight is a get_attr of its dequantized constant: the marker wraps it.
        source = node if node.op == "get_attr" else node.args[0]
        with gm.graph.inserting_after(node):
            marker = _marker(gm, table, source, entry)
        node.replace_all_uses_with(marker, delete_user_cb=lambda user: user is not marker)
        if node is not source:
            gm.graph.erase_node(node)
    eliminate_dead_code(gm.graph)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm.eval(), table


class _MarkerLowering:
    """Rewrites the marker nodes of an exported ModelProto into Q/DQ."""

    def __init__(self, model: onnx.ModelProto, table: list[Entry], shift_signed: bool = True) -> None:
        self.model = model
        self.table = table
        self.shift_signed = shift_signed
        self.added: set[str] = set()

    def _initializer(self, name: str, make) -> str:
        if name not in self.added:
            self.model.graph.initializer.append(make())
            self.added.add(name)
        return name

    def _weight(self, entry: IntegerWeight, source: str, output: str) -> list[onnx.NodeProto]:
        data_type = _onnx_type(entry.bits, signed=True)
        shape = [entry.scale.numel()] if entry.axis is not None else []
        inputs = [
            self._initializer(f"{entry.path}_quantized", lambda: integer_initializer(
                f"{entry.path}_quantized", entry.values, data_type)),
            self._initializer(f"{entry.path}_scale", lambda: numpy_helper.from_array(
                entry.scale.numpy().reshape(shape), f"{entry.path}_scale")),
            self._initializer(f"{entry.path}_zero_point", lambda: integer_initializer(
                f"{entry.path}_zero_point", torch.zeros(shape, dtype=torch.int8), data_type)),
        ]
        attributes = {"axis": entry.axis} if entry.axis is not None else {}
        # Named after the output: a layer called twice dequantizes its weight twice, and
        # node names must be unique.
        return [helper.make_node("DequantizeLinear", inputs, [output], name=f"{output}_dequantize", **attributes)]

    def _activation(self, entry: ActivationQuant, source: str, output: str) -> list[onnx.NodeProto]:
        # A signed range is written unsigned with the zero point at its middle: the same integers
        # shifted, so the same values. onnxruntime's QDQS8ToU8Transformer would otherwise make
        # that shift itself, and the Q nodes its later fusions copy keep output_dtype INT8 with
        # the new UINT8 zero point, which fails the session (onnxruntime 1.32).
        # TensorRT (``shift_signed=False``) takes signed INT8 with zero point 0 only.
        data_type = _onnx_type(entry.bits, signed=entry.signed and not self.shift_signed)
        offset = 2 ** (entry.bits - 1) if entry.signed and self.shift_signed else 0
        scale = self._initializer(f"{entry.path}.scale", lambda: numpy_helper.from_array(
            np.array(entry.scale, dtype=np.float32), f"{entry.path}.scale"))
        zero_point = self._initializer(f"{entry.path}.zero_point", lambda: integer_initializer(
            f"{entry.path}.zero_point", torch.tensor(offset, dtype=torch.int16), data_type))
        quantized = f"{output}_quantized"
        return [
            helper.make_node("QuantizeLinear", [source, scale, zero_point], [quantized], name=f"{output}_quantize"),
            helper.make_node("DequantizeLinear", [quantized, scale, zero_point], [output], name=f"{output}_dequantize"),
        ]

    def _unscaled(self, entry: Unscaled, source: str, output: str) -> list[onnx.NodeProto]:
        base = entry.entry
        unit = self._initializer("ptqat_fx.unit_scale", lambda: numpy_helper.from_array(
            np.array(1.0, dtype=np.float32), "ptqat_fx.unit_scale"))
        if isinstance(base, IntegerWeight):
            data_type = _onnx_type(base.bits, signed=True)
            values = self._initializer(f"{base.path}_quantized", lambda: integer_initializer(
                f"{base.path}_quantized", base.values, data_type))
            zero_point = self._initializer(f"{base.path}_unit_zero_point", lambda: integer_initializer(
                f"{base.path}_unit_zero_point", torch.zeros((), dtype=torch.int8), data_type))
            return [helper.make_node("DequantizeLinear", [values, unit, zero_point], [output], name=f"{output}_integers")]
        quantize, _ = self._activation(base, source, output)
        return [quantize, helper.make_node(
            "DequantizeLinear", [quantize.output[0], unit, quantize.input[2]], [output], name=f"{output}_integers")]

    def run(self) -> onnx.ModelProto:
        graph = self.model.graph
        nodes = []
        for node in graph.node:
            if node.domain != DOMAIN:
                nodes.append(node)
                continue
            entry = self.table[helper.get_attribute_value(node.attribute[0])]
            lower = {IntegerWeight: self._weight, ActivationQuant: self._activation, Unscaled: self._unscaled}[type(entry)]
            nodes.extend(lower(entry, node.input[0], node.output[0]))
        del graph.node[:]
        graph.node.extend(nodes)
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        kept = [init for init in graph.initializer if init.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        imports = [entry for entry in self.model.opset_import if entry.domain != DOMAIN]
        del self.model.opset_import[:]
        self.model.opset_import.extend(imports)
        return self.model


def _batch_shapes(example_inputs: tuple) -> tuple:
    """torch.export dynamic shapes: axis 0 of every tensor input is the one ``batch`` dim."""
    batch = torch.export.Dim("batch")
    return tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() else None for x in example_inputs)


def export_onnx(
    qmodel: fx.GraphModule,
    example_inputs: tuple,
    path: str | os.PathLike,
    opset: int | None = None,
    *,
    dynamic_batch: bool = False,
    target: str = "onnxruntime",
) -> onnx.ModelProto:
    """Write ``qmodel`` (calibrated fake-quant, exported in eval mode) to ``path`` as a Q/DQ
    ONNX model, checked with ``onnx.checker.check_model(full_check=True)``; returns it.

    Weights become INT8 initializers (INT4 for weights of 4 bits or fewer, which needs
    ``opset >= 21``) with a per-channel DequantizeLinear; activations a QuantizeLinear ->
    DequantizeLinear pair. ``opset`` defaults to 21. With ``dynamic_batch`` the first axis
    of every tensor input (and so of the outputs) is symbolic (``batch``): one file runs at
    any batch size.

    ``target="tensorrt"`` exports for TensorRT's explicit quantization: weights of 4 bits or
    fewer are stored as INT8 holding their 4-bit integers (TensorRT runs INT4 only
    weight-only in GEMM/MatMul; same numerics), and the graph must pass
    ``export.tensorrt_rules.check`` (symmetric INT8, per-channel weights on the output axis,
    fusable Q/DQ placement, INT4 rules) or the export raises naming each broken rule. Every
    export stores a per-layer ``DeployReport`` (which layers run INT8, INT4 weight-only or
    float, and why) in the model's ``metadata_props``: ``print(DeployReport.of(model))``
    (``ptqat_fx.views.deploy_report``).

    Leaf modules (kept eager by capture) are exported with their layers lowered as modules
    (``leaf_lowering``). Where a leaf decides on tensor values, which ``torch.export`` cannot
    capture, the graph takes the path the example inputs take, and a ``UserWarning`` names each
    such decision (``export.data_dependent``).

    Raises:
        CalibrationError: a quantizer was never calibrated.
        InputError: ``opset`` too old for the model's bit widths (the message names it),
            activations of a bit width ONNX Q/DQ cannot express, or ``dynamic_batch`` on a
            graph whose capture fixed the batch size (a reshape to a traced size); an unknown
            ``target``, or with ``target="tensorrt"`` a graph breaking TensorRT's rules.
    """
    require_quantized_float32(qmodel, "export_onnx")
    opset = DEFAULT_OPSET if opset is None else opset
    if not isinstance(example_inputs, tuple):
        raise InputError(f"example_inputs must be a tuple of the model's inputs, got {type(example_inputs).__name__}")
    if target not in tensorrt_rules.TARGETS:
        raise InputError(f"target={target!r}: choose one of {tensorrt_rules.TARGETS}")
    specialized = qmodel.meta.get(SPECIALIZATION_KEY)
    if dynamic_batch and specialized is not None:
        raise InputError(
            f"dynamic_batch=True: the captured graph is {specialized} (capture answered shape queries "
            "from the example inputs), so it serves only that batch size; export with dynamic_batch=False, "
            "or make the model's shape arithmetic traceable (x.flatten(1), x.view(x.shape[0], -1))"
        )
    tensorrt = target == "tensorrt"
    gm, table = marker_graph(qmodel, integer_layers=not tensorrt)
    if tensorrt:
        table = tensorrt_rules.tensorrt_table(table)
    _check_opset(table, opset)
    dynamic_shapes = _batch_shapes(example_inputs) if dynamic_batch else None

    def onnx_program(model: fx.GraphModule | torch.export.ExportedProgram):
        return torch.onnx.export(
            model, example_inputs, dynamo=True, opset_version=opset, custom_translation_table=translation_table(),
            dynamic_shapes=dynamic_shapes, verbose=False,
        )

    try:
        try:
            program = onnx_program(gm)
        except Exception as error:  # torch.onnx wraps torch.export's errors in its own
            if not is_data_dependent(error):
                raise
            # A leaf decides on tensor values: capture it along the example inputs' path.
            program = onnx_program(specialised_program(gm, example_inputs, dynamic_shapes))
    except Exception as error:  # torch raises several types when a dimension is specialised
        if dynamic_batch and "batch" in str(error):
            raise InputError(
                f"dynamic_batch=True: the captured graph fixes the batch size ({str(error).splitlines()[0][:200]}); "
                "capture with a shape-agnostic reshape (x.flatten(1), x.view(x.shape[0], -1)) or export "
                "with dynamic_batch=False"
            ) from error
        raise
    model = _MarkerLowering(program.model_proto, table, shift_signed=not tensorrt).run()
    if not tensorrt:  # an onnxruntime fusion's mistake; TensorRT's file keeps the exported ops
        model = relu_for_fragile_clips(model)
    onnx.checker.check_model(model, full_check=True)
    if tensorrt:
        tensorrt_rules.require(model)
    attach(model, deploy_report(layer_specs(qmodel), model, target))
    onnx.save(model, os.fspath(path))
    return model
