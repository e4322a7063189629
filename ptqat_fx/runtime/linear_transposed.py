"""``linear_transposed``: a linear layer whose weight is laid out ``[in, out]``.

transformers' ``Conv1D`` (GPT-2's attention and MLP projections) holds its weight transposed
against ``nn.Linear`` and computes ``torch.addmm(bias, x.view(-1, in), weight)``. Capture
rewrites such an ``addmm`` of a parameter weight into this function, which the layer kinds
know (``layer_kinds``: kind ``linear_transposed``, output channels on weight axis 1), so the
projection gets a weight quantizer like any linear layer. It computes what the ``addmm`` did.
"""
from __future__ import annotations

import torch


def linear_transposed(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``input @ weight + bias`` for a 2-D ``input`` and a ``[in, out]`` ``weight``."""
    return torch.mm(input, weight) if bias is None else torch.addmm(bias, input, weight)
