"""How much of a quantized model is quantized, and what was traced: ``coverage(gm)``.

Counts the quantizable layers a user would count: every Conv/Linear module of the model
(whether the graph calls it, a leaf runs it, or a wrapped function uses its weight), plus the
functional layers and activation matmuls of the graph. A layer module is quantized when it
holds a weight ``FakeQuantizer`` (``<path>.weight_fake_quant``, from the graph rewrite or a
leaf's module-level quantization). Matmuls inside leaf modules run eagerly and are invisible
to the graph: they are neither counted nor quantized.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from .layer_kinds import kind_of_type
from .layer_spec import layer_specs
from .meta import auto_leaves, module_types
from .runtime.quantizer import FakeQuantizer
from .capture import AutoLeaf


@dataclass
class Coverage:
    """Quantizable layers of a quantized GraphModule and how many got quantizers.

    Attributes:
        layers: quantizable layers found.
        quantized: those with quantizers.
        float_layers: paths of the ones left in float.
        auto_leaves: modules that did not trace and run eagerly (``trace(auto_leaf=True)``).
    """

    layers: int
    quantized: int
    float_layers: list[str] = field(default_factory=list)
    auto_leaves: list[AutoLeaf] = field(default_factory=list)

    @property
    def traced_whole(self) -> bool:
        return not self.auto_leaves

    @property
    def share(self) -> float:
        """Quantized share of the quantizable layers (1.0 when there are none)."""
        return self.quantized / self.layers if self.layers else 1.0

    def __str__(self) -> str:
        if not self.layers:
            return "no quantizable layer (conv, linear, matmul) found: the model runs in float"
        lines = [
            f"quantized {self.quantized}/{self.layers} quantizable layers ({self.share:.0%}); "
            + ("traced whole" if self.traced_whole else f"{len(self.auto_leaves)} auto-leaves")
        ]
        for leaf in self.auto_leaves:
            lines.append(f"auto-leaf {leaf.path!r}: {leaf.error}" + (f" at {leaf.line}" if leaf.line else ""))
            lines.append(f"  quantized inside: {', '.join(leaf.quantized) or 'none'}")
            if leaf.float_layers:
                lines.append(f"  left in float: {', '.join(leaf.float_layers)}")
        if self.float_layers:
            lines.append(f"left in float: {', '.join(self.float_layers)}")
        return "\n".join(lines)


def _weight_quantized(gm: fx.GraphModule, path: str) -> bool:
    try:
        return isinstance(gm.get_submodule(f"{path}.weight_fake_quant"), FakeQuantizer)
    except AttributeError:
        return False


def coverage(gm: fx.GraphModule) -> Coverage:
    """The ``Coverage`` of a GraphModule returned by ``quantize`` (traced by ``trace``)."""
    types = module_types(gm) or {path: type(m) for path, m in gm.named_modules()}
    module_paths = [path for path, cls in types.items() if (kind := kind_of_type(cls)) is not None and kind.weighted]
    # A layer whose weight is tied to another's uses that layer's quantizer (one per Parameter).
    tied = {spec.module_path for spec in layer_specs(gm) if spec.weight_quantizer is not None}
    float_modules = [path for path in module_paths if path not in tied and not _weight_quantized(gm, path)]
    graph_only = [
        spec for spec in layer_specs(gm)
        if spec.module_path is None and (spec.weight is None or spec.weight.rpartition(".")[0] not in types)
    ]
    layers = len(module_paths) + len(graph_only)
    return Coverage(layers, layers - len(float_modules), float_modules, auto_leaves(gm))

