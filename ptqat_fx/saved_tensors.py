"""Count what autograd keeps for backward: the memory a training step holds between
forward and backward, measured deterministically on any device."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def saved_tensor_bytes(forward: Callable[[], Any]) -> int:
    """Bytes of the distinct storages autograd saves while ``forward()`` runs.

    Each storage counts once however many saved tensors view it (a ReLU output that the next
    quantizer also keeps costs once), so the figure is what a training step must hold.
    """
    storages: dict[tuple[int, str], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[(storage.data_ptr(), str(tensor.device))] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(storages.values())
