"""Every ``gm.meta`` / ``node.meta`` key ptqat-fx reads or writes, as typed accessors.

Passes record what they did in ``node.meta`` (``torch.fx`` convention, as ``ShapeProp``
records ``tensor_meta``); the model-wide choices go to ``gm.meta``. No other module spells a
key: they call these functions, so a key is renamed, documented and typed in one place.
``serialization`` writes and reads the dictionaries whole.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import fx

if TYPE_CHECKING:
    from .config import QuantConfig, Select
    from .layer_spec import LayerSpec
    from .capture import AutoLeaf

# node.meta keys
LAYER = "ptqat_layer"  # LayerSpec of a quantizable layer (annotate)
LEAF = "ptqat_leaf"  # {"quantized": [...], "float": [...]} of a leaf module call (quantize_leaves)
JOIN = "ptqat_join_quantizer"  # path of an add/concat's shared quantizer (quantize_joins)
FROZEN = "frozen"  # a layer whose weight freeze made constant
FLOAT_WEIGHT = "ptqat_float_weight"  # the float weight's path at a frozen weight's get_attr
FUSED_FROM = "ptqat_fused_from"  # (op, target) before freeze fused the input quantizers in
CONVERT = "ptqat_convert"  # what a dequantize node of convert lowered
FOLDED_BN = "folded_bn"  # path of the BatchNorm folded into a conv (fold_bn)
# gm.meta keys
CONFIG = "ptqat_config"
AUTO_LEAVES_KEY = "ptqat_auto_leaves"  # [AutoLeaf]: modules capture left to run eagerly
# GraphModule keeps only what the graph references (a parameter used through get_attr keeps
# a bare Module at its owner's path), so capture records the module types at trace time.
MODULE_TYPES_KEY = "ptqat_module_types"
RECORDED_CALLS_KEY = "ptqat_recorded_calls"  # library functions capture recorded as one call
SPECIALIZATION_KEY = "ptqat_specialization"  # the example shapes the graph was captured for
SELECT = "ptqat_select"
NUM_INPUTS = "ptqat_num_inputs"  # how finetune() splits batches into inputs and labels
# torch's own keys that ptqat-fx reads
_MODULE_STACK = "nn_module_stack"
_TENSOR_META = "tensor_meta"


@dataclass(frozen=True)
class DiscrepancyKey:
    """Which discrepancy: ``mode`` (``local`` / ``accumulated``) and ``metric``; its string
    ``"<mode>.<metric>"`` keys ``LayerSpec.discrepancy``."""

    mode: str
    metric: str

    def __str__(self) -> str:
        return f"{self.mode}.{self.metric}"

    @classmethod
    def of(cls, select: Select | None) -> DiscrepancyKey:
        """The key ``select`` ranks by; the default ranking's without one."""
        return cls(select.mode, select.metric) if select is not None else DEFAULT_DISCREPANCY


DEFAULT_DISCREPANCY = DiscrepancyKey("accumulated", "relative")


def bits_label(w_bits: int | None, a_bits: int | None) -> str:
    """``W4A8``; ``A8`` for a layer without a weight (an activation matmul)."""
    return f"W{w_bits}A{a_bits}" if w_bits else f"A{a_bits}"


def layer_spec(node: fx.Node) -> LayerSpec | None:
    return node.meta.get(LAYER)


def set_layer_spec(node: fx.Node, spec: LayerSpec | None) -> None:
    """Attach ``spec`` to ``node``; None removes it."""
    if spec is None:
        node.meta.pop(LAYER, None)
    else:
        node.meta[LAYER] = spec


def leaf_record(node: fx.Node) -> dict[str, list[str]] | None:
    return node.meta.get(LEAF)


def set_leaf_record(node: fx.Node, record: dict[str, list[str]]) -> None:
    node.meta[LEAF] = record


def join_quantizer(node: fx.Node) -> str | None:
    return node.meta.get(JOIN)


def set_join_quantizer(node: fx.Node, path: str) -> None:
    node.meta[JOIN] = path


def is_frozen(node: fx.Node) -> bool:
    return bool(node.meta.get(FROZEN))


def mark_frozen(node: fx.Node) -> None:
    node.meta[FROZEN] = True


def float_weight(node: fx.Node) -> str | None:
    return node.meta.get(FLOAT_WEIGHT)


def set_float_weight(node: fx.Node, path: str) -> None:
    node.meta[FLOAT_WEIGHT] = path


def fused_from(node: fx.Node) -> tuple[str, Any] | None:
    return node.meta.get(FUSED_FROM)


def set_fused_from(node: fx.Node, plain: tuple[str, Any]) -> None:
    node.meta[FUSED_FROM] = plain


def pop_fused_from(node: fx.Node) -> tuple[str, Any] | None:
    return node.meta.pop(FUSED_FROM, None)


def converted(node: fx.Node) -> dict[str, Any] | None:
    return node.meta.get(CONVERT)


def set_converted(node: fx.Node, record: dict[str, Any]) -> None:
    node.meta[CONVERT] = record


def folded_bn(node: fx.Node) -> str | None:
    return node.meta.get(FOLDED_BN)


def set_folded_bn(node: fx.Node, path: str) -> None:
    node.meta[FOLDED_BN] = path


def module_stack(node: fx.Node) -> dict[str, tuple[str, type]]:
    """torch.fx's ``nn_module_stack``: the modules whose forward made the call, outermost first."""
    return node.meta.get(_MODULE_STACK) or {}


def tensor_meta(node: fx.Node) -> Any:
    """``ShapeProp``'s ``tensor_meta``, None before shapes were propagated."""
    return node.meta.get(_TENSOR_META)


def config(gm: fx.GraphModule) -> QuantConfig | None:
    return gm.meta.get(CONFIG)


def set_config(gm: fx.GraphModule, value: QuantConfig) -> None:
    gm.meta[CONFIG] = value


def selection(gm: fx.GraphModule) -> Select | None:
    return gm.meta.get(SELECT)


def set_selection(gm: fx.GraphModule, value: Select) -> None:
    gm.meta[SELECT] = value


def num_inputs(gm: fx.GraphModule) -> int | None:
    return gm.meta.get(NUM_INPUTS)


def set_num_inputs(gm: fx.GraphModule, value: int) -> None:
    gm.meta[NUM_INPUTS] = value


def auto_leaves(gm: fx.GraphModule) -> list[AutoLeaf]:
    """The modules ``trace(auto_leaf=True)`` made leaves, empty when none."""
    return list(gm.meta.get(AUTO_LEAVES_KEY, []))


def module_types(gm: fx.GraphModule) -> dict[str, type]:
    """Module path -> class of every module of the traced model (as ``trace`` recorded it)."""
    return gm.meta.get(MODULE_TYPES_KEY) or {}
