"""The freeze rewrite: only the selected layers keep ``requires_grad``; frozen layers are
rewritten so that training them costs as little as possible.

Setting ``requires_grad=False`` alone saves almost nothing (measured: <= 15% memory, ~5% time
on ResNet-50 with half the layers frozen), because frozen layers still quantize their weights
every step and keep their inputs for backward. For every frozen layer this pass

* replaces the weight fake-quant node by a constant: the dequantized weight computed once,
  a ``frozen_weight`` buffer on the weight quantizer (its integer values are
  ``frozen_weight / scale`` exactly);
* freezes the step size of its input quantizer, which then keeps only a one-byte clip mask,
  or nothing new where the producer of its input keeps that tensor anyway (ReLU, sigmoid,
  tanh and softmax keep their outputs);
* turns ``F.conv{1,2,3}d`` into ``frozen_conv``, which keeps only the weight for backward
  (``F.linear`` already does when its weight needs no gradient).

Every selected (trainable) layer is fused with its input quantizers into one
``quantized_linear`` / ``quantized_conv`` / ``quantized_matmul`` call that keeps only the
unquantized input for backward and recomputes the quantized one.

Layers inside leaf modules (module level) follow the selection by ``requires_grad`` only:
their weight quantizers keep running, as there is no graph node to make constant.

Where nothing trainable lies upstream of a frozen layer, no input needs a gradient and
autograd records nothing for it. A quantizer or weight shared with a selected layer stays
trainable. Parameters outside quantizable layers (norms, embeddings) are frozen unless
``train_other_params``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from ..errors import ConfigError
from ..layer_kinds import kind, kind_of_function
from ..layer_spec import LayerSpec, layer_nodes, layer_specs
from ..meta import fused_from, is_frozen, layer_spec, mark_frozen, set_float_weight, set_fused_from
from ..runtime.quantizer import FROZEN_WEIGHT, FakeQuantizer, fake_quantize_forward, is_quantizer_node, step_sizes

_KEEPS_OUTPUT_MODULES = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.Sigmoid, torch.nn.Tanh, torch.nn.Softmax)
_KEEPS_OUTPUT_FUNCTIONS = {F.relu, torch.relu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.softmax, torch.softmax}
_KEEPS_OUTPUT_METHODS = {"relu", "sigmoid", "tanh", "softmax"}


def _canonical(gm: fx.GraphModule, path: str | None, names_of: dict[int, str]) -> str | None:
    """The name ``named_parameters`` gives the parameter at ``path`` (a tied weight has one
    name however many layers use it), or None."""
    if path is None:
        return None
    try:
        return names_of.get(id(gm.get_parameter(path)))
    except AttributeError:
        return None  # convert made it a buffer


def trainable_names(gm: fx.GraphModule, train_other_params: bool = False) -> set[str]:
    """Parameter names that stay trainable given each LayerSpec's ``selected`` flag: those of
    graph layers and of layers inside leaves (module level), by their ``named_parameters``
    name, so a weight tied between a selected and a frozen layer stays trainable."""
    trainable: set[str] = set()
    in_layers: set[str] = set()
    names_of = {id(parameter): name for name, parameter in gm.named_parameters()}
    steps = step_sizes(gm)
    for spec in layer_specs(gm):
        quantizer_paths = [spec.weight_quantizer, *spec.input_quantizers]
        names = [_canonical(gm, spec.weight, names_of), _canonical(gm, spec.bias, names_of)]
        names += [names_of.get(id(gm.get_submodule(q).scale)) for q in quantizer_paths if q is not None]
        names = [n for n in names if n is not None]
        in_layers.update(names)
        if spec.selected:
            trainable.update(names)
    if train_other_params:
        trainable.update(
            name for name, parameter in gm.named_parameters()
            if name not in in_layers and id(parameter) not in steps
        )
    return trainable


def _freeze_weight(gm: fx.GraphModule, node: fx.Node, spec: LayerSpec) -> None:
    weight_node = node.args[1]
    quantizer: FakeQuantizer = gm.get_submodule(spec.weight_quantizer)
    # The calibrated step applied once, in the reference arithmetic (a new tensor): the
    # quantizer's own forward would take the autograd Function and, on CUDA, the Triton
    # kernel, whose first call in a process compiles it (measured: 0.4 s, 12x the float
    # forwards of ResNet-50's calibration set on an H200). The kernel computes the same bits.
    with torch.no_grad():
        constant = fake_quantize_forward(
            gm.get_parameter(spec.weight), quantizer.scale, quantizer.qmin, quantizer.qmax, quantizer.channel_axis
        )
    quantizer.register_buffer(FROZEN_WEIGHT, constant)
    with gm.graph.inserting_before(weight_node):
        frozen = gm.graph.get_attr(f"{spec.weight_quantizer}.{FROZEN_WEIGHT}")
    # The analysis reads the float side of a frozen weight from here.
    set_float_weight(frozen, spec.weight)
    weight_node.replace_all_uses_with(frozen)
    if not weight_node.users:
        parameter_node = weight_node.args[0]
        gm.graph.erase_node(weight_node)
        if not parameter_node.users:
            gm.graph.erase_node(parameter_node)
    mark_frozen(node)
    layer_kind = kind(spec.kind)
    if layer_kind.frozen is not None and node.target is layer_kind.function and not _padding_is_text(node):
        node.target = layer_kind.frozen


def _producer_keeps_output(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether autograd keeps ``node``'s output anyway (for its own backward)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, _KEEPS_OUTPUT_MODULES) and not getattr(module, "inplace", False)
    if node.op == "call_function":
        return node.target in _KEEPS_OUTPUT_FUNCTIONS and not node.kwargs.get("inplace", False)
    return node.op == "call_method" and node.target in _KEEPS_OUTPUT_METHODS


def _padding_is_text(node: fx.Node) -> bool:
    return isinstance(node.args[4] if len(node.args) > 4 else 0, str)


def _quantizer_operand(gm: fx.GraphModule, operand: object) -> fx.Node | None:
    """``operand`` if a per-tensor quantizer made it, else None."""
    if not (isinstance(operand, fx.Node) and is_quantizer_node(gm, operand)):
        return None
    return operand if gm.get_submodule(operand.target).channel_axis is None else None


def _fused_operand(gm: fx.GraphModule, quantizer_node: fx.Node) -> tuple:
    """(source, scale node, qmin, qmax): what a quantized_* call takes for one operand."""
    quantizer: FakeQuantizer = gm.get_submodule(quantizer_node.target)
    with gm.graph.inserting_before(quantizer_node):
        scale = gm.graph.get_attr(f"{quantizer_node.target}.scale")
    return quantizer_node.args[0], scale, quantizer.qmin, quantizer.qmax


def _fuse_input_quantizers(gm: fx.GraphModule, node: fx.Node, spec: LayerSpec) -> None:
    """Rewrite a trainable layer into its quantized_* form, if its inputs allow."""
    plain = (node.op, node.target)
    layer_kind = kind(spec.kind)
    if layer_kind.fused is None:
        return
    if not layer_kind.weighted:
        if len(node.args) != 2 or node.kwargs:
            return
        replaced = [_quantizer_operand(gm, arg) for arg in node.args]
        if None in replaced:
            return
        first, second = (_fused_operand(gm, operand) for operand in replaced)
        node.op, node.target, node.args = "call_function", layer_kind.fused, (*first, *second)
    elif kind_of_function(node.target) is layer_kind and not node.kwargs and not _padding_is_text(node):
        operand = _quantizer_operand(gm, node.args[0])
        if operand is None:
            return
        replaced = [operand]
        node.args = (*_fused_operand(gm, operand), *node.args[1:])
        node.target = layer_kind.fused
    else:
        return
    set_fused_from(node, plain)
    for quantizer_node in replaced:
        if not quantizer_node.users:
            gm.graph.erase_node(quantizer_node)


def freeze(gm: fx.GraphModule, train_other_params: bool = False) -> fx.GraphModule:
    """Apply the selection (``LayerSpec.selected``, see ``select_layers``) to ``gm``.

    Afterwards the parameters with ``requires_grad`` are exactly the selected layers'
    weights, biases, weight step sizes and input step sizes (plus other parameters if
    ``train_other_params``). Outputs are unchanged. Returns ``gm``, rewritten in place.
    """
    specs = layer_specs(gm)
    if any(spec.selected is None for spec in specs):
        raise ConfigError("freeze needs a selection: run select_layers (or quantize with select=...) first")
    trainable = trainable_names(gm, train_other_params)
    for name, parameter in gm.named_parameters():
        parameter.requires_grad_(name in trainable)
    names_of = {id(parameter): name for name, parameter in gm.named_parameters()}
    for node in layer_nodes(gm):
        spec: LayerSpec = layer_spec(node)
        if is_frozen(node) or fused_from(node) is not None:
            continue  # rewritten by an earlier freeze
        if spec.weight is not None and _canonical(gm, spec.weight, names_of) not in trainable:
            _freeze_weight(gm, node, spec)
        elif spec.selected:
            _fuse_input_quantizers(gm, node, spec)
    for node in gm.graph.nodes:
        if is_quantizer_node(gm, node) and isinstance(node.args[0], fx.Node):
            gm.get_submodule(node.target).save_input = _producer_keeps_output(gm, node.args[0])
    gm.graph.lint()
    gm.recompile()
    return gm
