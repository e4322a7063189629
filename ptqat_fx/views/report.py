"""``report(gm)``: what was quantized, what each layer's discrepancy is, what PTQAT trains."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import fx

from ..capture import specialization
from ..checks import require_quantized
from ..config import QuantConfig, Select
from ..layer_graph import layer_graph
from ..layer_spec import layer_specs
from ..meta import DiscrepancyKey, auto_leaves, bits_label, config, selection
from .layer_rows import LayerRow, trainable_layer_params
from .selection_words import selection_words


@dataclass
class Report:
    """Per-layer table and totals of a quantized model; ``str(report)`` renders it.

    Attributes:
        rows: one ``LayerRow`` per quantizable layer, in graph order.
        key: the discrepancy shown (``"<mode>.<metric>"``), the one selection ranked by.
        select: the selection rule, or None if no selection ran.
        config: the quantization config.
        quantizable_params / trainable_quantizable_params: weights and biases of all
            quantizable layers, and of the trainable ones.
        trainable_params / total_params: every parameter of the model (step sizes included).
        notes: remarks a user should not miss (nothing selected, auto-leaves...).
        layer_edges: the layer graph's edges ``(source, target)`` by layer name.
        shapes: the input shapes the graph (and its nested graphs) serve
            (``capture.specialization``), the report's first line.
    """

    rows: list[LayerRow]
    key: str
    select: Select | None
    config: QuantConfig | None
    quantizable_params: int
    trainable_quantizable_params: int
    trainable_params: int
    total_params: int
    notes: list[str] = field(default_factory=list)
    layer_edges: list[tuple[str, str]] = field(default_factory=list)
    shapes: str = "captured for any input shape"

    @property
    def selected(self) -> list[str]:
        return [row.name for row in self.rows if row.selected]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the report."""
        return {
            "key": self.key,
            "select": repr(self.select),
            "config": repr(self.config),
            "quantizable_params": self.quantizable_params,
            "trainable_quantizable_params": self.trainable_quantizable_params,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "notes": self.notes,
            "shapes": self.shapes,
            "layers": [vars(row) for row in self.rows],
        }

    def save_html(self, path: str | Path, title: str = "ptqat-fx report") -> Path:
        """Write the report as one self-contained HTML page (see ``report_html``); needs
        matplotlib. Returns the path."""
        from .report_html import write_html  # matplotlib is optional: imported on use

        return write_html(self, path, title)

    def __str__(self) -> str:
        width = max([len(row.name) for row in self.rows] + [5])
        header = f"{'#':>3}  {'layer':<{width}}  {'kind':<16} {'params':>10} {'bits':>5}  {self.key:>22}  {'train':>5}"
        lines = [self.shapes, header, "-" * len(header)]
        for row in self.rows:
            bits = bits_label(row.w_bits, row.a_bits)
            value = "-" if row.discrepancy is None else f"{row.discrepancy:.4g}"
            train = {True: "yes", False: "no", None: "-"}[row.selected]
            lines.append(
                f"{row.index:>3}  {row.name:<{width}}  {row.kind:<16} {row.params:>10,} {bits:>5}  {value:>22}  {train:>5}"
            )
        share = self.trainable_quantizable_params / self.quantizable_params if self.quantizable_params else 0.0
        lines.append("-" * len(header))
        chosen = sum(bool(row.selected) for row in self.rows)
        rule = selection_words(self.select)
        lines.append(
            f"{len(self.rows)} quantizable layers, {chosen} trainable ({rule}); "
            f"trainable layer parameters {self.trainable_quantizable_params:,} / {self.quantizable_params:,} ({share:.1%}); "
            f"all trainable parameters {self.trainable_params:,} / {self.total_params:,}"
        )
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def _notes(rows: list[LayerRow], select: Select | None, gm: fx.GraphModule) -> list[str]:
    notes = []
    chosen = sum(bool(row.selected) for row in rows)
    if select is not None and select.theta is not None and select.strategy in ("small", "large"):
        if chosen == 0:
            notes.append(f"theta={select.theta} selected no layer: the model stays pure PTQ")
        elif chosen == len(rows):
            notes.append(f"theta={select.theta} selected every layer: this is full QAT")
    for leaf in auto_leaves(gm):
        notes.append(
            f"auto-leaf {leaf.path!r} runs eagerly ({leaf.error}); its layers are quantized, analysed "
            "and selected at module level"
            + (f"; left in float: {', '.join(leaf.float_layers)}" if leaf.float_layers else "")
        )
    return notes


def _shapes(gm: fx.GraphModule) -> str:
    """"captured for input shapes x [2, 3, 64, 64]" (the root graph's specialization), and how
    many nested graphs are specialized to the shapes they were called with."""
    root = specialization(gm)
    nested = sum(specialization(m) is not None for name, m in gm.named_modules() if name and isinstance(m, fx.GraphModule))
    text = "captured for any input shape" if root is None else "captured for input shapes " + ", ".join(
        f"{name} {list(shape)}" for name, shape in root.input_shapes.items()
    ) + " (other shapes are refused)"
    if nested:
        text += f"; {nested} nested graph{'s' if nested > 1 else ''} specialized to the shapes they were called with"
    return text


def report(gm: fx.GraphModule, key: str | None = None) -> Report:
    """The report of a model returned by ``quantize`` (or by the passes in order).

    Args:
        gm: the quantized GraphModule.
        key: the discrepancy to show, ``"<mode>.<metric>"``; by default the one the selection
            ranked by (``accumulated.relative`` unless the Select said otherwise).
    """
    require_quantized(gm, "report")
    select: Select | None = selection(gm)
    key = key or str(DiscrepancyKey.of(select))
    rows = [
        LayerRow(index, spec.name, spec.kind, spec.params, spec.w_bits, spec.a_bits,
                 spec.discrepancy.get(key), spec.selected, trainable_layer_params(gm, spec))
        for index, spec in enumerate(layer_specs(gm))
    ]
    trainable_quantizable = sum(row.trainable_params for row in rows)
    parameters = list(gm.parameters())
    return Report(
        rows=rows,
        key=key,
        select=select,
        config=config(gm),
        quantizable_params=sum(row.params for row in rows),
        trainable_quantizable_params=trainable_quantizable,
        trainable_params=sum(p.numel() for p in parameters if p.requires_grad),
        total_params=sum(p.numel() for p in parameters),
        notes=_notes(rows, select, gm),
        layer_edges=list(layer_graph(gm).edges),
        shapes=_shapes(gm),
    )
