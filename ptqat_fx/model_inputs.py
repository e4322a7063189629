"""How a batch of user data becomes the positional arguments of the model."""
from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .errors import InputError


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


class KeywordBatches:
    """Re-iterable view of batches given by argument name (dicts), as positional tuples in the
    order of ``signature``, with its defaults filled in.

    Used when a model is quantized with ``example_kwargs``: each calibration batch is then a
    dict of forward arguments by name, positional ones included.
    """

    def __init__(self, batches: Iterable[Any], signature: inspect.Signature) -> None:
        self.batches = batches
        self.signature = signature

    def __iter__(self) -> Iterator[tuple]:
        for index, batch in enumerate(self.batches):
            if not isinstance(batch, dict):
                raise InputError(
                    f"calib_data batch {index} is a {type(batch).__name__}; with example_kwargs every "
                    "batch must be a dict of the forward's arguments by name"
                )
            yield bind_positional(self.signature, (), batch)


def bind_positional(signature: inspect.Signature, args: tuple, kwargs: dict[str, Any]) -> tuple:
    """``args`` and ``kwargs`` as one positional tuple in ``signature``'s order, defaults filled."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as error:
        raise InputError(f"inputs do not match the traced forward{signature}: {error}") from error
    bound.apply_defaults()
    return tuple(bound.arguments.values())
