"""Per-channel MSE clip search with every candidate at once, and the step for a zero range.

Today's observer tries its 100 candidate clips one after another, each a pass of seven
element-wise ops over the whole weight: 700 passes, and on a GPU 700 kernel launches per
layer. ``mse_channel_clip`` evaluates a block of channels against all candidates in one
broadcast, blocks sized so the temporaries stay within ``max_elements`` (cache-sized on the
CPU, a few hundred MB on a GPU), on the tensor's own device. It performs the same float32
operations in the same order for each candidate as the loop, and picks the first candidate of
least error as the loop's strict ``<`` does, so it returns the same clips.

``zero_range_steps``: a weight channel whose range is zero (torchvision ViT's zero-initialised
head) would get step 1.0; its quantized value then stays 0 until the latent weight reaches
0.5, which fine-tuning never does, and a zero head blocks every upstream gradient.
"""
from __future__ import annotations

import torch

MSE_CANDIDATES = 100
# A channel range of this fraction of 1/sqrt(fan_in), the bound of torch's default
# (Kaiming-uniform) initialisation of Linear and Conv weights, for a weight that is all zero:
# fine enough that the first updates cross half a step, coarse enough to span what a freshly
# initialised layer holds.
ZERO_RANGE_FRACTION = 0.5


def candidate_ratios(candidates: int = MSE_CANDIDATES) -> torch.Tensor:
    """The clip candidates as fractions of the range: 1/n, 2/n, ..., 1 (float32)."""
    return torch.linspace(1.0 / candidates, 1.0, candidates)


def _default_budget(device: torch.device) -> int:
    # CPU: ~1 MB temporaries stay in cache; GPU: large enough to fill the device in one launch.
    return 1 << 18 if device.type == "cpu" else 1 << 25


def mse_channel_clip(
    values: torch.Tensor, abs_max: torch.Tensor, qmax: int, candidates: int = MSE_CANDIDATES,
    max_elements: int | None = None,
) -> torch.Tensor:
    """The clip per channel that minimises the squared error of quantizing ``values``.

    Args:
        values: magnitudes, [channels, K] float32 (one row per step).
        abs_max: the range per channel, [channels]; candidates are ``abs_max * i / candidates``.
        qmax: the largest quantized magnitude.
        max_elements: bound on the elements of one broadcast temporary (default by device).

    Returns:
        [channels] clips, equal to the observer's sequential search.
    """
    if values.dim() != 2 or abs_max.shape != values.shape[:1]:
        raise ValueError(f"values must be [channels, K] and abs_max [channels]; got {tuple(values.shape)} "
                         f"and {tuple(abs_max.shape)}")
    channels, k = values.shape
    ratios = candidate_ratios(candidates).to(values.device)
    budget = max_elements or _default_budget(values.device)
    # Candidates per block and channels per block, so that block * k * cand <= budget.
    cand_block = max(1, min(candidates, budget // max(k, 1)))
    chan_block = max(1, budget // max(k * cand_block, 1))
    best = abs_max.clone()
    for start in range(0, channels, chan_block):
        rows = slice(start, start + chan_block)
        row_values = values[rows, None, :]
        errors = []
        for first in range(0, candidates, cand_block):
            clips = abs_max[rows, None] * ratios[None, first:first + cand_block]
            step = clips.clamp_min(1e-30)[..., None] / qmax
            quantized = (row_values / step).round_().clamp_(max=qmax).mul_(step)
            errors.append(quantized.sub_(row_values).square_().sum(-1))
        error = torch.cat(errors, 1).nan_to_num_(nan=float("inf"))
        least, index = error.min(1)
        chosen = abs_max[rows] * ratios[index]
        # A channel with no finite error keeps its range, as the loop's initial value.
        best[rows] = torch.where(least < float("inf"), chosen, abs_max[rows])
    return best


def zero_range_steps(
    steps: torch.Tensor, fan_in: int, qmax: int, fraction: float = ZERO_RANGE_FRACTION
) -> torch.Tensor:
    """``steps`` with every non-positive (zero-range) entry replaced by
    ``fraction / sqrt(fan_in) / qmax``, so a weight that starts at zero can learn.

    ``fan_in``: the elements that share one step (a conv's in_channels/groups * kernel area,
    a linear layer's in_features)."""
    if fan_in < 1 or qmax < 1:
        raise ValueError(f"fan_in and qmax must be positive; got {fan_in} and {qmax}")
    fallback = fraction / fan_in**0.5 / qmax
    return torch.where(steps > 0, steps, torch.full_like(steps, fallback))
