"""The per-layer deploy report of an ONNX export: which layers run INT8, INT4 weight-only or
float in the target engine, and why.

``export_onnx`` builds it from the model's layers and the exported graph and stores it in the
file's ``metadata_props`` (key ``ptqat_fx.deploy_report``, JSON), so it travels with the
model; read it back with ``DeployReport.of(model_or_path)`` and print it::

    model = ptqat_fx.export_onnx(qmodel, (x,), "model.onnx", target="tensorrt")
    print(DeployReport.of(model))
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import onnx
from onnx import TensorProto

from ..export.tensorrt_rules import QDQGraph, fusion_notes
from ..layer_spec import LayerSpec
from ..meta import bits_label

REPORT_KEY = "ptqat_fx.deploy_report"
INT8 = "INT8"
INT8_ON_4BIT_GRID = "INT8 (4-bit grid)"
INT4_WEIGHT_ONLY = "INT4 weight-only"
INT4_QDQ = "INT4 Q/DQ"
FLOAT = "float"


@dataclass(frozen=True)
class DeployedLayer:
    """One layer of the report: ``precision`` is one of ``INT8``, ``INT8 (4-bit grid)``,
    ``INT4 weight-only``, ``INT4 Q/DQ`` (stored INT4, dequantized by the engine) or ``float``;
    ``onnx_node`` the ONNX node that computes it ("" where the export has none)."""

    name: str
    kind: str
    bits: str
    precision: str
    onnx_node: str
    why: str


@dataclass(frozen=True)
class DeployReport:
    """Per-layer precisions of an exported model in ``target`` (``onnxruntime`` or
    ``tensorrt``), and ``notes`` on fusions the graph allows but does not make optimal."""

    target: str
    layers: tuple[DeployedLayer, ...]
    notes: tuple[str, ...] = ()

    def counts(self) -> dict[str, int]:
        """precision -> number of layers."""
        counts: dict[str, int] = {}
        for layer in self.layers:
            counts[layer.precision] = counts.get(layer.precision, 0) + 1
        return counts

    def to_json(self) -> str:
        return json.dumps({"target": self.target, "layers": [asdict(l) for l in self.layers], "notes": list(self.notes)})

    @classmethod
    def from_json(cls, text: str) -> DeployReport:
        data = json.loads(text)
        return cls(data["target"], tuple(DeployedLayer(**layer) for layer in data["layers"]), tuple(data["notes"]))

    @classmethod
    def of(cls, model: onnx.ModelProto | str | os.PathLike) -> DeployReport:
        """The report ``export_onnx`` stored in ``model`` (a ModelProto or a path)."""
        if not isinstance(model, onnx.ModelProto):
            model = onnx.load(os.fspath(model), load_external_data=False)
        for prop in model.metadata_props:
            if prop.key == REPORT_KEY:
                return cls.from_json(prop.value)
        raise KeyError(f"the model has no {REPORT_KEY!r} metadata; export it with ptqat_fx.export_onnx")

    def __str__(self) -> str:
        header = ("layer", "kind", "bits", "runs as", "ONNX node", "why")
        rows = [header] + [(l.name, l.kind, l.bits, l.precision, l.onnx_node or "-", l.why) for l in self.layers]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
        lines = [f"Deploy report ({self.target}): " + ", ".join(f"{n} {p}" for p, n in self.counts().items())]
        lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _why_int8(spec: LayerSpec, target: str) -> tuple[str, str]:
    if spec.w_bits is not None and spec.w_bits <= 4:
        if target == "tensorrt":
            return INT8_ON_4BIT_GRID, (f"{spec.w_bits}-bit integers stored as INT8 (same numerics): TensorRT's INT4 "
                                       "is weight-only, GEMM/MatMul only, and this input is quantized")
        return INT8_ON_4BIT_GRID, f"{spec.w_bits}-bit weights stored as INT8 with an INT8 input"
    return INT8, "INT8 weights per output channel and an INT8 input: an integer kernel"


def _classify(graph: QDQGraph, spec: LayerSpec, target: str, call: int) -> tuple[str, str, str]:
    """(precision, ONNX node, why) of one layer."""
    if spec.weight_quantizer is None and not spec.input_quantizers:
        return FLOAT, "", "not quantized (QuantConfig.skip or a layer the passes leave float)"
    if spec.weight is None:
        scales = {f"{path}.scale" for path in spec.input_quantizers}
        layers = [user for node in graph.nodes if node.op_type == "DequantizeLinear" and node.input[1] in scales
                  for user in graph.consumers.get(node.output[0], []) if user.op_type in ("MatMul", "Gemm")]
        layer = layers[min(call, len(layers) - 1)] if layers else None
        if layer is not None and all(graph.from_dequantize(i) is not None for i in layer.input[:2]):
            return INT8, layer.name, "both inputs INT8 (no weight)"
        return FLOAT, layer.name if layer is not None else "", "its inputs are not both quantized"
    dqs = [node for node in graph.nodes if graph.is_weight_dq(node) and node.input[0] == f"{spec.weight}_quantized"]
    uses = [use for use in (graph.weight_use(dq) for dq in dqs) if use is not None]
    if not uses:
        return FLOAT, "", "its weight is not quantized in the export"
    layer = uses[min(call, len(uses) - 1)][0]
    data_type = graph.quantized_type(graph.weight_dq(layer))
    quantized_input = graph.from_dequantize(layer.input[0]) is not None
    if data_type == TensorProto.INT4:
        if not quantized_input:
            return INT4_WEIGHT_ONLY, layer.name, "INT4 block-wise weights, float input: a weight-only GEMM"
        return INT4_QDQ, layer.name, ("INT4 weights with an INT8 input: dequantized to float by the engine; "
                                      "TensorRT has no kernel for it (export with target='tensorrt')")
    if not quantized_input:
        return FLOAT, layer.name, "INT8 weights but a float input: the engine dequantizes and runs float"
    precision, why = _why_int8(spec, target)
    return precision, layer.name, why


def deploy_report(specs: list[LayerSpec], model: onnx.ModelProto, target: str) -> DeployReport:
    """The report of ``model``, exported from a graph whose layers are ``specs``, for
    ``target``. Layers are matched to ONNX nodes by their weight initializer
    (``<weight>_quantized``) or, for activation matmuls, their input quantizers' scales
    (``<quantizer>.scale``): the names the exporter gives them."""
    graph = QDQGraph(model)
    layers = []
    for spec in specs:
        call = int(spec.name.rpartition("#")[2]) if "#" in spec.name else 0
        precision, node, why = _classify(graph, spec, target, call)
        bits = bits_label(spec.w_bits, spec.a_bits) if spec.a_bits else FLOAT
        layers.append(DeployedLayer(spec.name, spec.kind, bits, precision, node, why))
    return DeployReport(target, tuple(layers), tuple(fusion_notes(model)))


def attach(model: onnx.ModelProto, report: DeployReport) -> None:
    """Store ``report`` in ``model.metadata_props`` (replacing an earlier one)."""
    kept = [prop for prop in model.metadata_props if prop.key != REPORT_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=REPORT_KEY, value=report.to_json())
