"""Frozen parts behave as frozen while fine-tuning: BatchNorm statistics and dropout as in eval.

``finetune`` puts the model in train mode. In a whole graph, BatchNorm is folded into its
conv and nothing frozen has train-mode behaviour left; inside a leaf module (which runs its
own forward, BatchNorm unfolded) a frozen layer's BatchNorm would still update its running
statistics in train mode, and its dropout would still drop: the "frozen" part changes and
the model trained against is not the one deployed. ``train_with_frozen_parts_in_eval``
sets train mode, then eval mode on

* every BatchNorm (and other ``_NormBase``) whose parameters are all frozen, or that has none,
  wherever it is: inside a leaf, or in the graph where folding did not take it (a BN after a
  linear or an add, as in LeViT or RepViT), so that it behaves as its folded form would;
* inside every leaf module the graph calls (a module with children, run eagerly), every
  dropout whose parent module's parameters (its whole subtree) are all frozen. Graph-level
  dropout keeps train mode: it belongs to the model as selection and freeze left it.

It returns the modules it put in eval, for the caller to restore.
"""
from __future__ import annotations

from torch import fx, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd


def _frozen(module: nn.Module) -> bool:
    """Whether no parameter of ``module`` (and its descendants) requires a gradient."""
    return not any(p.requires_grad for p in module.parameters())


def _leaves(model: nn.Module) -> list[nn.Module]:
    """The modules with children that ``model``'s graph calls (leaves, nested captures)."""
    graph = getattr(model, "graph", None)
    if not isinstance(graph, fx.Graph):
        return []
    found: dict[int, nn.Module] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            if any(True for _ in module.children()):
                found[id(module)] = module
    return list(found.values())


def train_with_frozen_parts_in_eval(model: nn.Module) -> list[nn.Module]:
    """``model.train()``, with its frozen norms and dropouts in eval (see the module
    docstring); the modules put in eval."""
    model.train()
    in_eval = [m.eval() for m in model.modules() if isinstance(m, _NormBase) and _frozen(m)]
    for parent in (m for leaf in _leaves(model) for m in leaf.modules()):
        if _frozen(parent):
            in_eval += [child.eval() for child in parent.children() if isinstance(child, (_DropoutNd, nn.AlphaDropout))]
    return in_eval
