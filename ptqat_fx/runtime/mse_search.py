"""Per-channel MSE clip search with every candidate at once, and the step for a zero range.

Today's observer tries its 100 candidate clips one after another, each a pass of seven
element-wise ops over the whole weight: 700 passes, and on a GPU 700 kernel launches per
layer. ``mse_channel_clip`` evaluates a block of channels against all candidates in one
broadcast, blocks sized so the temporaries stay within ``max_elements`` (cache-sized on the
CPU, a few hundred MB on a GPU), on the tensor's own device. It performs the same float32
operations in the same order for each candidate as the loop, and picks the first candidate of
least error as the loop's strict ``<`` does, so it returns the same clips.

That is still 100 passes over the weight. ``mse_channel_clip`` therefore screens first: with
the magnitudes of a channel sorted and their prefix sums, the squared error of one candidate
is a closed form over its ``qmax + 1`` rounding intervals (``sum v^2 - 2ks sum v + n (ks)^2``
per interval, found by binary search), in float64, at ``O(qmax log K)`` per candidate instead
of ``O(K)``. The float32 error the loop computes differs from it by a bounded amount
(``_float32_error_bound``), so only candidates within twice that bound of the least are
evaluated exactly, in the loop's float32 arithmetic; the choice among them is the loop's.

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
    # CPU: temporaries of a few MB stay in cache; GPU: large enough to fill the device in one launch.
    return 1 << 20 if device.type == "cpu" else 1 << 25


def _exhaustive_clip(
    values: torch.Tensor, abs_max: torch.Tensor, qmax: int, candidates: int, budget: int
) -> torch.Tensor:
    """Every candidate of every channel in float32, in blocks of at most ``budget`` elements."""
    channels, k = values.shape
    ratios = candidate_ratios(candidates).to(values.device)
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


def _float32_errors(values: torch.Tensor, clips: torch.Tensor, qmax: int) -> torch.Tensor:
    """The loop's float32 squared error of each row of ``values`` [P, K] at ``clips`` [P]."""
    step = clips.clamp_min(1e-30)[:, None] / qmax
    quantized = (values / step).round_().clamp_(max=qmax).mul_(step)
    return quantized.sub_(values).square_().sum(-1)


def _edge_positions(qmax: int, candidates: int, device: torch.device) -> torch.Tensor:
    """[N, qmax] bins of the rounding edges: candidate ``i``'s edge between levels ``k - 1`` and
    ``k`` lies at ``(k - 1/2) s = (2k - 1) i / (2 N qmax)`` of the range, i.e. at the integer
    ``(2k - 1) i`` in units of ``range / (2 N qmax)``."""
    ratio = torch.arange(1, candidates + 1, device=device)[:, None]
    odd = torch.arange(1, 2 * qmax, 2, device=device)[None, :]
    return ratio * odd


def _closed_form_errors(values: torch.Tensor, abs_max: torch.Tensor, clips: torch.Tensor, qmax: int) -> torch.Tensor:
    """Squared errors [C, N] of quantizing each row of ``values`` [C, K] at ``clips`` [C, N],
    in float64 from a histogram of each row. Every candidate's rounding edges fall on the
    integers of ``t = v / range * 2 N qmax`` (``_edge_positions``), so one pass bins each element
    at ``floor(t)`` (counts and float64 sums per bin; no sort) and the prefix sums of the bins
    give, per edge ``k``, the elements below it ``i_k`` and their sum ``F_k``. Summing by parts,
    an element at level ``k`` lies above exactly ``k`` edges, so
    ``sum (v - q)^2 = sum v^2 - 2s (qmax F[K] - sum_k F_k) + s^2 (qmax^2 K - sum_k (2k - 1) i_k)``."""
    channels, k = values.shape
    candidates = clips.shape[1]
    bins = 2 * candidates * qmax + 1
    # float32 binning: an element lands at most a few ulps of the range from its exact bin
    # (``_float32_error_bound`` counts that as one more rounding tie resolved either way).
    # Magnitudes are finite and at most the range, so t <= (bins - 1)(1 + 2u): truncation is
    # the floor and no clamp is needed.
    # int32: half the traffic of int64 (``mse_channel_clip`` keeps a block's bins below 2^31).
    position = (values * ((bins - 1) / abs_max)[:, None]).int()
    position += torch.arange(0, channels * bins, bins, device=values.device, dtype=torch.int32)[:, None]
    wide = values.double()
    counts = torch.bincount(position.view(-1), minlength=channels * bins).view(channels, bins)
    sums = torch.bincount(position.view(-1), wide.view(-1), minlength=channels * bins).view(channels, bins)
    # Elements below edge e: the bins 0..e-1, i.e. the prefix sum at e - 1 (every edge is >= 1).
    edges = _edge_positions(qmax, candidates, values.device).flatten() - 1
    index = counts.cumsum(1)[:, edges].double().view(channels, candidates, qmax)      # i_k per candidate
    prefix = sums.cumsum(1)
    below = prefix[:, edges].view(channels, candidates, qmax).sum(2)                  # sum_k F_k
    levels = torch.arange(1, qmax + 1, dtype=torch.float64, device=values.device)
    weighted = (index * (2 * levels - 1)).sum(2)                                      # sum_k (2k-1) i_k
    step = (clips.clamp_min(1e-30) / qmax).double()           # the loop's step, widened
    total = prefix[:, -1:]
    squares = torch.linalg.vector_norm(wide, dim=1, keepdim=True).square()
    errors = squares - 2 * step * (qmax * total - below) + step.square() * (qmax**2 * k - weighted)
    return errors.clamp_min(0)


def _float32_error_bound(errors: torch.Tensor, abs_max: torch.Tensor, k: int) -> torch.Tensor:
    """A bound on |loop's float32 error - closed form| for [C, N] closed-form ``errors``: per
    element the loop's quantized value is off by at most ~3u max|v| (division, a rounding tie
    resolved either way, multiplication); the closed form may bin an element within ~5u max|v|
    of an edge on the other side (float32 binning, the float32 clip against its exact ratio),
    moving it by twice that; so its distance d moves by e < 16u max|v|, and ``sum (d + e)^2 - d^2 <= 2e sqrt(K
    sum d^2) + K e^2``; the float32 squares and sum of K terms add at most (K + 1) u of it. The
    closed form's own float64 cancellation is below K^2 2^-50 max|v|^2 (prefix sums of K terms)."""
    u = 2.0**-24
    top = abs_max.double()[:, None]
    e = 16 * u * top
    float64 = k * k * 2.0**-50 * top.square()
    return 2 * (2 * e * (k * errors).sqrt() + k * e.square() + (k + 2) * u * errors + float64) + 1e-30


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
        [channels] clips, equal to the observer's former sequential search.
    """
    if values.dim() != 2 or abs_max.shape != values.shape[:1]:
        raise ValueError(f"values must be [channels, K] and abs_max [channels]; got {tuple(values.shape)} "
                         f"and {tuple(abs_max.shape)}")
    budget = max_elements or _default_budget(values.device)
    channels, k = values.shape
    if channels == 0 or k == 0:
        return abs_max.clone()
    ratios = candidate_ratios(candidates).to(values.device)
    clips = abs_max[:, None] * ratios[None, :]                 # [C, N], the loop's float32 clips
    best = abs_max.clone()
    # Channels the closed form cannot bound (zero or non-finite range) take the full search.
    plain = ~(torch.isfinite(abs_max) & (abs_max > 0))
    if plain.any():
        rows = plain.nonzero().squeeze(1)
        best[rows] = _exhaustive_clip(values[rows], abs_max[rows], qmax, candidates, budget)
    rows = (~plain).nonzero().squeeze(1)
    if rows.numel() == 0:
        return best
    # Channels per block so the closed form's histograms and [rows, N, qmax] tables fit the budget.
    bins = 2 * candidates * qmax + 1
    # (Positions are int32: a block's bins stay below 2^31.)
    block = max(1, min(budget // max(bins, k), (2**31 - 1) // bins))
    for start in range(0, rows.numel(), block):
        chunk = rows[start:start + block]
        exact = _closed_form_errors(values[chunk], abs_max[chunk], clips[chunk], qmax)
        bound = _float32_error_bound(exact, abs_max[chunk], k)
        # Any candidate the loop could prefer has exact error within both bounds of the least.
        threshold = (exact + bound).amin(1, keepdim=True) + bound
        survivors = exact <= threshold
        # Where one candidate survives, it is the loop's choice; the others are decided by the
        # loop's own float32 errors.
        single = survivors.sum(1) == 1
        best[chunk[single]] = clips[chunk[single]][survivors[single]]
        open_rows = (~single).nonzero().squeeze(1)
        if open_rows.numel() == 0:
            continue
        chunk, exact = chunk[open_rows], exact[open_rows]
        channel, candidate = survivors[open_rows].nonzero(as_tuple=True)
        pairs = max(1, budget // k)  # (channel, candidate) rows per float32 evaluation
        errors = torch.cat([
            _float32_errors(values[chunk[channel[i:i + pairs]]], clips[chunk[channel[i:i + pairs]],
                            candidate[i:i + pairs]], qmax)
            for i in range(0, channel.numel(), pairs)
        ])
        errors = errors.nan_to_num_(nan=float("inf"))
        # The first of least float32 error per channel, as the loop's strict ``<`` keeps.
        table = torch.full_like(exact, float("inf"), dtype=errors.dtype)
        table[channel, candidate] = errors
        least, index = table.min(1)
        chosen = clips[chunk].gather(1, index[:, None]).squeeze(1)
        best[chunk] = torch.where(least < float("inf"), chosen, abs_max[chunk])
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
