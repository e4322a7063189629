"""Range observers: turn the tensors seen during calibration into initial step sizes.

An observer only ever sees magnitudes: quantization is symmetric, so the error of a step
size depends on |x| alone. Per-tensor activations are summarised in a histogram of |x| whose
range doubles when a larger value arrives, so memory stays bounded whatever the calibration
set's size, and percentile and MSE searches run on the histogram. Per-channel tensors
(weights) are kept whole: they are constant during calibration, so a weight seen again
unchanged (same tensor, same version) is not re-read. A weight channel of zero range gets a
step from its fan-in (``mse_search.zero_range_steps``), so a zero-initialised layer can learn.

Statistics stay on the tensor's device and are kept only where the rule reads them (the
histogram, the sum of |x|): on a GPU every number read back to the host waits for the stream,
so a per-tensor observer reads one per batch (the batch maximum, the histogram's range) and
none where its rule needs no histogram, and choosing a clip reads none.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from .mse_search import MSE_CANDIDATES, mse_channel_clip, zero_range_steps

HISTOGRAM_BINS = 2048
SWEEP_PERCENTILES = (99.0, 99.9, 99.99, 99.999, 100.0)
# A scale for activations that were all zeros: any scale represents zero exactly; 1.0 keeps
# the LSQ gradient well conditioned if non-zero values arrive during fine-tuning. (Weights
# get a step from their fan-in instead: with 1.0 a zero weight could never leave zero.)
ZERO_RANGE_SCALE = 1.0
# Weights up to this many elements are searched together with others of their fan-in, in
# concatenations of up to as many (a bounded extra copy); larger ones alone.
MSE_BATCH_ELEMENTS = 1 << 22


def _batches(members: list[int], rows: int, observers: list[RangeObserver]) -> list[list[int]]:
    """``members`` in consecutive runs of at most ``rows`` channels (at least one each)."""
    runs: list[list[int]] = [[]]
    count = 0
    for index in members:
        channels = observers[index].latest.shape[0]
        if runs[-1] and count + channels > rows:
            runs.append([])
            count = 0
        runs[-1].append(index)
        count += channels
    return runs


def _quantization_error(values: torch.Tensor, clip: torch.Tensor, qmax: int) -> torch.Tensor:
    """Squared error of quantizing magnitudes ``values`` [..., K] with clip ``clip`` [..., 1]."""
    step = clip / qmax
    return (values - (values / step).round().clamp(max=qmax) * step).square()


class ClipRule:
    """How an observer turns the statistics of a ``RangeObserver`` into a clipping range: one
    small class per method, registered by name with ``register_observer``."""

    name: ClassVar[str]
    # Which per-tensor statistics ``tensor_clip`` reads besides ``abs_max``: the |x| histogram
    # (whose range needs the batch maximum on the host), the sum and count of |x|.
    uses_histogram: ClassVar[bool] = True
    uses_sum: ClassVar[bool] = False

    def channel_clip(self, observer: RangeObserver) -> torch.Tensor:
        """Clip per channel [C] from ``observer.latest`` [C, K] and ``observer.abs_max`` [C]."""
        raise NotImplementedError

    def channel_clips(self, observers: list[RangeObserver]) -> list[torch.Tensor]:
        """``channel_clip`` of each of ``observers`` (per-channel, of this rule); a rule may
        compute several at once where that gives the same clips."""
        return [self.channel_clip(observer) for observer in observers]

    def tensor_clip(self, observer: RangeObserver) -> torch.Tensor:
        """Clip for one tensor from ``observer``'s |x| histogram (``histogram_values``)."""
        raise NotImplementedError


OBSERVERS: dict[str, type[ClipRule]] = {}


def register_observer(rule: type[ClipRule]) -> type[ClipRule]:
    """Class decorator: make ``rule`` available as ``QuantConfig(w_observer=rule.name)``."""
    OBSERVERS[rule.name] = rule
    return rule


@register_observer
class MinMax(ClipRule):
    """The absolute maximum."""

    name = "minmax"
    uses_histogram = False

    def channel_clip(self, observer: RangeObserver) -> torch.Tensor:
        return observer.abs_max

    def tensor_clip(self, observer: RangeObserver) -> torch.Tensor:
        return observer.abs_max


@register_observer
class Percentile(ClipRule):
    """The ``percentile`` of |x|."""

    name = "percentile"

    def channel_clip(self, observer: RangeObserver) -> torch.Tensor:
        return torch.quantile(observer.latest, observer.percentile / 100.0, dim=1)

    def tensor_clip(self, observer: RangeObserver) -> torch.Tensor:
        return observer.histogram_percentile(observer.percentile)


@register_observer
class LSQInit(ClipRule):
    """The LSQ paper's initial step, ``2 * mean|x| / sqrt(qmax)``, as a clip."""

    name = "lsq"
    uses_histogram = False
    uses_sum = True

    def channel_clip(self, observer: RangeObserver) -> torch.Tensor:
        return 2.0 * observer.latest.mean(dim=1) * observer.qmax**0.5

    def tensor_clip(self, observer: RangeObserver) -> torch.Tensor:
        # float64 on the device, the host formula's operations in its order.
        return 2.0 * observer.abs_sum / observer.count * observer.qmax**0.5


@register_observer
class MSESearch(ClipRule):
    """The clip among ``MSE_CANDIDATES`` fractions of the maximum with the least squared
    quantization error (per channel: every candidate at once, on the weight's device)."""

    name = "mse"

    def channel_clip(self, observer: RangeObserver) -> torch.Tensor:
        return mse_channel_clip(observer.latest, observer.abs_max, observer.qmax)

    def channel_clips(self, observers: list[RangeObserver]) -> list[torch.Tensor]:
        # The search is row by row, so the rows of small weights of one fan-in, qmax and
        # device are searched together: a GPU runs a few dozen kernels and a few host
        # read-backs per search, whatever the size (ResNet-50: 54 searches, 11 fan-ins).
        clips: dict[int, torch.Tensor] = {}
        groups: dict[tuple, list[int]] = {}
        for index, observer in enumerate(observers):
            if observer.latest.numel() > MSE_BATCH_ELEMENTS:
                clips[index] = self.channel_clip(observer)
            else:
                key = (observer.latest.shape[1], observer.qmax, observer.latest.device, observer.latest.dtype)
                groups.setdefault(key, []).append(index)
        for (fan_in, qmax, _, _), members in groups.items():
            for batch in _batches(members, MSE_BATCH_ELEMENTS // max(fan_in, 1), observers):
                values = torch.cat([observers[i].latest for i in batch])
                abs_max = torch.cat([observers[i].abs_max for i in batch])
                found = mse_channel_clip(values, abs_max, qmax)
                for i, clip in zip(batch, found.split([observers[i].latest.shape[0] for i in batch])):
                    clips[i] = clip
        return [clips[index] for index in range(len(observers))]

    def tensor_clip(self, observer: RangeObserver) -> torch.Tensor:
        top = observer.host_max
        clips = torch.linspace(top / MSE_CANDIDATES, top, MSE_CANDIDATES, dtype=torch.float64)
        return observer.best_tensor_clip(clips)


@register_observer
class PercentileSweep(ClipRule):
    """The clip among the percentiles ``SWEEP_PERCENTILES`` of |x| with the least squared
    quantization error: the percentile observer without choosing the percentile by hand."""

    name = "percentile_sweep"

    def channel_clip(self, observer: RangeObserver) -> torch.Tensor:
        levels = torch.tensor(SWEEP_PERCENTILES, dtype=observer.latest.dtype) / 100.0
        candidates = torch.quantile(observer.latest, levels.to(observer.latest.device), dim=1)
        return observer.best_channel_clip(list(candidates))

    def tensor_clip(self, observer: RangeObserver) -> torch.Tensor:
        clips = torch.stack([observer.histogram_percentile(p) for p in SWEEP_PERCENTILES]).double()
        return observer.best_tensor_clip(clips)


class DeferredHistograms:
    """Per-tensor observers' batches, binned together later: one host read-back of all their
    maxima (``flush``) instead of one per observer and batch. On a GPU each read-back waits
    for the stream, so a forward that observes stalls at every quantizer, and the host cannot
    queue work ahead of the device. Each observer bins its batches in the order they came,
    so the histograms are the same. Holds the magnitudes until then, up to ``max_bytes``,
    beyond which it flushes at once."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.pending: list[tuple[RangeObserver, torch.Tensor, torch.Tensor]] = []
        self.bytes = 0

    def add(self, observer: RangeObserver, magnitude: torch.Tensor, batch_max: torch.Tensor) -> None:
        self.pending.append((observer, magnitude, batch_max))
        self.bytes += magnitude.nbytes
        if self.bytes > self.max_bytes:
            self.flush()

    def flush(self) -> None:
        """Bin everything pending (one read-back per device)."""
        pending, self.pending, self.bytes = self.pending, [], 0
        by_device: dict[torch.device, list[int]] = {}
        for index, (_, _, batch_max) in enumerate(pending):
            by_device.setdefault(batch_max.device, []).append(index)
        tops: dict[int, float] = {}
        for indices in by_device.values():
            tops.update(zip(indices, torch.stack([pending[i][2] for i in indices]).tolist()))
        for index, (observer, magnitude, batch_max) in enumerate(pending):
            observer.bin(magnitude, batch_max, tops[index])


class RangeObserver:
    """Collects |x| statistics and proposes a step size.

    Args:
        method: a registered observer name (``OBSERVERS``): ``minmax``, ``percentile``,
            ``mse``, ``lsq``...
        qmax: the largest quantized magnitude (127 for signed 8-bit, 255 for unsigned).
        channel_axis: keep statistics per slice along this axis (weights), else per tensor.
        percentile: for ``percentile``, in (0, 100].
    """

    def __init__(
        self, method: str, qmax: int, channel_axis: int | None = None, percentile: float = 99.99
    ) -> None:
        self.method = method
        self.rule = OBSERVERS[method]()
        self.qmax = qmax
        self.channel_axis = channel_axis
        self.percentile = percentile
        self.batches = 0
        self.abs_max: torch.Tensor | None = None
        self.abs_sum: torch.Tensor | float = 0.0
        self.count = 0
        self.host_max = 0.0  # float(abs_max) of a per-tensor observer with a histogram
        self.histogram: torch.Tensor | None = None
        self.latest: torch.Tensor | None = None
        # The per-channel tensor last read and its version counter: a weight is fed once per
        # calibration batch, and re-reading it unchanged would redo the same work.
        self._source: tuple[torch.Tensor, int] | None = None
        # Where a histogram's batches wait to be binned together with other observers'.
        self.deferred: DeferredHistograms | None = None

    def update(self, x: torch.Tensor) -> None:
        """Add one tensor's statistics."""
        self.batches += 1
        if self.channel_axis is not None:
            if self._source is not None and self._source[0] is x and self._source[1] == x._version:
                return  # the same weight, unchanged: abs_max and latest already hold it
            self._source = (x, x._version)
            magnitude = x.detach().abs().float()
            per_channel = magnitude.transpose(0, self.channel_axis).flatten(1)
            channel_max = per_channel.amax(dim=1)
            self.abs_max = channel_max if self.abs_max is None else self.abs_max.maximum(channel_max)
            self.latest = per_channel
            return
        magnitude = x.detach().abs().float()
        self.count += magnitude.numel()
        if self.rule.uses_sum:
            # A float64 tensor, not a Python float: reading it back would wait for the device.
            self.abs_sum = self.abs_sum + magnitude.sum().double()
        batch_max = magnitude.max()
        if not self.rule.uses_histogram:
            self.abs_max = batch_max if self.abs_max is None else torch.maximum(self.abs_max, batch_max)
            return
        if self.deferred is not None:
            self.deferred.add(self, magnitude, batch_max)
            return
        # The one read-back per batch (histc takes its range as a number).
        self.bin(magnitude, batch_max, float(batch_max))

    def bin(self, magnitude: torch.Tensor, batch_max: torch.Tensor, batch_top: float) -> None:
        """Add the magnitudes of one tensor to the histogram, ``batch_max`` their maximum
        (``batch_top`` the same on the host); in the order the tensors came."""
        if self.abs_max is None:
            self.abs_max, self.host_max = batch_max, batch_top
            self.histogram = torch.zeros(HISTOGRAM_BINS, dtype=torch.float64, device=magnitude.device)
        elif batch_top > self.host_max:
            self._widen(batch_top)
            self.abs_max, self.host_max = batch_max, batch_top
        top = self.host_max
        if top > 0:
            # float32 counts added to the float64 histogram (exactly, as a cast would).
            self.histogram += torch.histc(magnitude, HISTOGRAM_BINS, 0.0, top)
        else:
            self.histogram[0] += magnitude.numel()

    def _widen(self, new_top: float) -> None:
        """Re-bin the histogram onto [0, new_top] so earlier counts are kept."""
        old_top = self.host_max
        if old_top <= 0:
            # Only zeros so far: they stay in the first bin of any range.
            return
        centres = self._bin_centres(old_top)
        target = (centres / new_top * HISTOGRAM_BINS).long().clamp(max=HISTOGRAM_BINS - 1)
        widened = torch.zeros_like(self.histogram)
        widened.index_add_(0, target, self.histogram)
        self.histogram = widened

    def _bin_centres(self, top: float) -> torch.Tensor:
        index = torch.arange(HISTOGRAM_BINS, dtype=torch.float64, device=self.histogram.device)
        return (index + 0.5) * (top / HISTOGRAM_BINS)

    def scale(self, clip: torch.Tensor | None = None) -> torch.Tensor:
        """The proposed step size: shape [channels] per channel, [1] per tensor. ``clip``: a
        per-channel clip already found by the rule (``ClipRule.channel_clips``)."""
        if self.batches == 0:
            raise RuntimeError("observer saw no data")
        if self.channel_axis is not None:
            step = (clip if clip is not None else self._channel_clip()).float() / self.qmax
            # The elements that share one step: the weight's fan-in.
            return zero_range_steps(step, max(self.latest.shape[1], 1), self.qmax)
        step = self._tensor_clip().reshape(1).float() / self.qmax
        return torch.where(step > 0, step, torch.full_like(step, ZERO_RANGE_SCALE))

    def _channel_clip(self) -> torch.Tensor:
        return self.rule.channel_clip(self)

    def _tensor_clip(self) -> torch.Tensor:
        # Only zeros seen: every rule's clip is 0 (the rules without a histogram compute it).
        if self.rule.uses_histogram and self.host_max == 0:
            return self.abs_max
        return self.rule.tensor_clip(self)

    def best_channel_clip(self, candidates: list[torch.Tensor]) -> torch.Tensor:
        """Per channel, the candidate clip [C] with the least squared quantization error of
        the weight (the first on ties)."""
        best_error = torch.full_like(self.abs_max, float("inf"))
        best_clip = self.abs_max.clone()
        for clip in candidates:
            error = _quantization_error(self.latest, clip.clamp_min(1e-30)[:, None], self.qmax).sum(1)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_clip = torch.where(better, clip, best_clip)
        return best_clip

    def best_tensor_clip(self, clips: torch.Tensor) -> torch.Tensor:
        """The clip of ``clips`` (float64 [K]) with the least squared quantization error over
        the histogram (the first on ties)."""
        centres = self._bin_centres(self.host_max)
        clips = clips.to(centres.device)
        errors = (_quantization_error(centres[None, :], clips[:, None], self.qmax) * self.histogram).sum(1)
        # Picked on the device (an int index would be read back).
        return clips.gather(0, errors.argmin().reshape(1))

    def histogram_percentile(self, percentile: float) -> torch.Tensor:
        """The upper edge of the histogram bin where the ``percentile`` of |x| falls."""
        top = self.host_max
        cumulative = (self.histogram.cumsum(0) / self.histogram.sum()).cpu()
        index = int(torch.searchsorted(cumulative, torch.tensor([percentile / 100.0], dtype=torch.float64)))
        return torch.tensor((min(index, HISTOGRAM_BINS - 1) + 1) * top / HISTOGRAM_BINS)
