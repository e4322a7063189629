"""RangeObserver step sizes against direct computations on the same data."""
from __future__ import annotations

import pytest
import torch

from ptqat_fx.runtime import observer as observer_module
from ptqat_fx.runtime.observer import RangeObserver


def _brute_force_mse_clip(x: torch.Tensor, qmax: int, candidates: torch.Tensor) -> float:
    errors = []
    for clip in candidates:
        step = clip / qmax
        errors.append(float((x.abs() - (x.abs() / step).round().clamp(max=qmax) * step).square().sum()))
    return float(candidates[int(torch.tensor(errors).argmin())])


def test_minmax_is_abs_max_over_all_batches():
    observer = RangeObserver("minmax", 127)
    for value in (1.0, -3.0, 2.0):
        observer.update(torch.tensor([0.5, value]))
    assert torch.allclose(observer.scale(), torch.tensor([3.0 / 127]))


def test_percentile_clips_outliers():
    torch.manual_seed(0)
    x = torch.randn(100_000)
    x[0] = 1000.0
    observer = RangeObserver("percentile", 127, percentile=99.0)
    observer.update(x)
    expected = float(torch.quantile(x.abs(), 0.99))
    # Histogram resolution: 1000 / 2048 per bin.
    assert abs(float(observer.scale()) * 127 - expected) < 1000 / 2048 + 1e-6


def test_mse_matches_brute_force_per_channel():
    torch.manual_seed(0)
    w = torch.randn(4, 200) * torch.tensor([[0.1], [1.0], [5.0], [0.01]])
    observer = RangeObserver("mse", 7, channel_axis=0)
    observer.update(w)
    scales = observer.scale()
    for channel in range(4):
        top = float(w[channel].abs().max())
        candidates = torch.linspace(0.01, 1.0, 100) * top
        expected = _brute_force_mse_clip(w[channel], 7, candidates)
        assert abs(float(scales[channel]) * 7 - expected) <= 1e-4 * top


def test_mse_histogram_is_close_to_brute_force_and_clips_at_4_bits():
    torch.manual_seed(0)
    x = torch.randn(50_000)
    observer = RangeObserver("mse", 7)
    for chunk in x.split(10_000):
        observer.update(chunk)
    top = float(x.abs().max())
    expected = _brute_force_mse_clip(x, 7, torch.linspace(top / 100, top, 100))
    assert abs(float(observer.scale()) * 7 - expected) <= 0.05 * top
    assert float(observer.scale()) * 7 < 0.8 * top


def test_histogram_widening_keeps_counts():
    observer = RangeObserver("percentile", 127, percentile=50.0)
    observer.update(torch.full((1000,), 0.1))
    observer.update(torch.full((10,), 10.0))
    assert float(observer.histogram.sum()) == 1010
    # The median is still the small value (within one bin of the widened range).
    assert float(observer.scale()) * 127 <= 0.1 + 10.0 / 2048 + 1e-6


def test_lsq_init_formula():
    x = torch.tensor([1.0, -2.0, 3.0, -4.0])
    observer = RangeObserver("lsq", 127)
    observer.update(x)
    assert abs(float(observer.scale()) - 2 * 2.5 / 127**0.5) < 1e-6


def test_percentile_sweep_picks_the_least_error_percentile_per_channel():
    torch.manual_seed(0)
    w = torch.randn(3, 500) * torch.tensor([[0.1], [1.0], [3.0]])
    w[1, 0] = 40.0  # an outlier the sweep should clip away
    observer = RangeObserver("percentile_sweep", 7, channel_axis=0)
    observer.update(w)
    clips = observer.scale() * 7
    for channel in range(3):
        magnitudes = w[channel].abs()
        candidates = torch.tensor([float(torch.quantile(magnitudes, p / 100)) for p in (99.0, 99.9, 99.99, 99.999, 100.0)])
        expected = _brute_force_mse_clip(w[channel], 7, candidates)
        assert abs(float(clips[channel]) - expected) < 1e-5 * max(expected, 1.0)
    assert float(clips[1]) < 40.0


def test_percentile_sweep_per_tensor_is_no_worse_than_any_fixed_percentile():
    torch.manual_seed(1)
    x = torch.randn(50_000)
    x[:5] = 60.0
    sweep = RangeObserver("percentile_sweep", 7)
    sweep.update(x)

    def error(scale: float) -> float:
        return float((x.abs() - (x.abs() / scale).round().clamp(max=7) * scale).square().sum())

    fixed = []
    for percentile in (99.0, 99.9, 99.99, 99.999, 100.0):
        observer = RangeObserver("percentile", 7, percentile=percentile)
        observer.update(x)
        fixed.append(error(float(observer.scale())))
    # Scored on the histogram, so equal to the best fixed percentile up to binning.
    assert error(float(sweep.scale())) <= min(fixed) * 1.01


class _HostReads:
    """Counts the ways a tensor's value reaches Python (on a GPU each waits for the stream)."""

    NAMES = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original):
                self.count += 1
                return _original(tensor, *args)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize(("method", "reads_per_batch"), [("mse", 1), ("percentile", 1), ("minmax", 0), ("lsq", 0)])
def test_per_tensor_observers_read_back_only_the_histogram_range(monkeypatch, method, reads_per_batch):
    batches = [torch.randn(1000, generator=torch.Generator().manual_seed(i)) * (i + 1) for i in range(3)]
    reference = RangeObserver(method, 127)
    for x in batches:
        reference.update(x)
    expected = reference.scale()
    reads = _HostReads(monkeypatch)
    observer = RangeObserver(method, 127)
    for x in batches:
        observer.update(x)
    assert reads.count == reads_per_batch * len(batches)
    if method != "percentile":  # its percentile search reads the histogram back once
        scale = observer.scale()
        assert reads.count == reads_per_batch * len(batches)
        monkeypatch.undo()
        assert torch.equal(scale, expected)


def test_mse_clips_found_together_equal_each_observer_alone(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    shapes = [(16, 8, 3, 3), (32, 8, 3, 3), (8, 72), (24, 8, 3, 3), (5, 10), (3, 72)]
    weights = [torch.randn(shape, generator=generator) for shape in shapes]
    weights[1][3] = 0.0        # a zero-range channel
    weights[4] = torch.zeros(5, 10)  # an all-zero weight
    weights[2][0, 0] = 30.0    # an outlier
    observers = []
    for index, weight in enumerate(weights):
        observer = RangeObserver("mse", 7 if index != 5 else 127, channel_axis=0)
        observer.update(weight)
        observers.append(observer)
    alone = [observer.scale() for observer in observers]
    # Small enough a bound that the 72-wide group is split into runs, and the largest weight
    # (32 x 72) is searched alone.
    monkeypatch.setattr(observer_module, "MSE_BATCH_ELEMENTS", 24 * 72)
    clips = observers[0].rule.channel_clips(observers)
    for observer, clip, expected in zip(observers, clips, alone):
        assert torch.equal(observer.scale(clip), expected)


@pytest.mark.parametrize("max_bytes", [1 << 30, 6000])
def test_deferred_histograms_equal_immediate_ones_with_one_read_back_per_flush(monkeypatch, max_bytes):
    generator = torch.Generator().manual_seed(0)
    # Ranges that grow and shrink between batches (the histogram widens), an all-zero batch
    # first, and the first observer fed twice per batch (a shared quantizer).
    batches = [[torch.zeros(500) if b == 0 and o == 1 else torch.randn(500, generator=generator) * (1 + (b * o) % 3)
                for o in range(4)] for b in range(3)]
    methods = ["mse", "mse", "percentile", "percentile_sweep"]
    immediate = [RangeObserver(method, 7) for method in methods]
    for batch in batches:
        for observer, x in zip([immediate[0], *immediate], [batch[3], *batch]):
            observer.update(x)
    reads = _HostReads(monkeypatch)
    deferred = observer_module.DeferredHistograms(max_bytes)
    observers = [RangeObserver(method, 7) for method in methods]
    for observer in observers:
        observer.deferred = deferred
    flushes = 0
    for batch in batches:
        for observer, x in zip([observers[0], *observers], [batch[3], *batch]):
            before = len(deferred.pending)
            observer.update(x)
            flushes += len(deferred.pending) < before + 1  # it flushed on its own: over max_bytes
        deferred.flush()
        flushes += 1
    assert reads.count == flushes and (flushes > len(batches)) == (max_bytes < 1 << 30)
    monkeypatch.undo()
    for mine, theirs in zip(observers, immediate):
        assert torch.equal(mine.histogram, theirs.histogram) and mine.host_max == theirs.host_max
        assert torch.equal(mine.scale(), theirs.scale())
