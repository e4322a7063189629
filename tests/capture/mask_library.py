"""A stand-in for transformers' ``masking_utils.create_causal_mask``, in a file of its own so
that capture treats it as library code: it rejects a Proxy, and returns None where no mask
tensor is needed (the attention then masks with ``is_causal``)."""
from __future__ import annotations

import torch


def causal_mask(queries: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor | None:
    if not isinstance(queries, torch.Tensor):
        raise TypeError(f"queries of type {type(queries).__name__}")
    if padding is None:
        return None
    n = queries.shape[-2]
    return torch.ones(n, n, dtype=torch.bool).tril() & padding[:, None, None, :]
