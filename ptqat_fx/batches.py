"""How a batch of user data becomes the positional arguments of the model."""
from __future__ import annotations

from typing import Any

import torch


def model_args(batch: Any, arity: int) -> tuple:
    """The model's positional inputs in ``batch``.

    A tensor is one input; a tuple or list holds the inputs first, and anything after the
    first ``arity`` items (labels, targets) is ignored, so ``(x, y)`` loaders work as they are.
    """
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)):
        return tuple(batch[:arity])
    return (batch,)
