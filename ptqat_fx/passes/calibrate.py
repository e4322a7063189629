"""PTQ calibration: run data through the graph with every quantizer observing, then set
the step sizes from what was seen and switch to fake-quant.

While observing, the graph computes in full precision, so every quantizer sees the ranges
of the float model.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import fx

from ..model_inputs import model_args
from ..errors import CalibrationError
from ..progress import progress_bar
from ..quantizer_factory import model_device
from ..runtime.observer import DeferredHistograms
from ..runtime.quantizer import finish_calibrations, quantizers
from .float_outputs import FloatOutputs


def _check_finite(args: tuple, index: int) -> None:
    for position, value in enumerate(args):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            raise CalibrationError(
                f"calib_data batch {index}, input {position}: contains NaN or Inf; "
                "clean or drop that batch"
            )


def _deferred_histograms(device: torch.device | None) -> DeferredHistograms | None:
    """On a GPU, histograms binned once per batch, after the forward, so that it runs
    without waiting for the device at every quantizer; holding the batch's magnitudes until
    then takes up to an eighth of the free memory. Elsewhere there is nothing to wait for."""
    if device is None or device.type != "cuda":
        return None
    return DeferredHistograms(torch.cuda.mem_get_info(device)[0] // 8)


def calibrate(
    gm: fx.GraphModule,
    calib_data: Iterable[Any],
    arity: int,
    *,
    progress: bool = True,
    record: FloatOutputs | None = None,
) -> fx.GraphModule:
    """Observe ``calib_data`` and initialise every quantizer's step size; returns ``gm``.

    Quantizers move to the device of the model's parameters first.

    Args:
        gm: a graph with FakeQuantizers (``insert_quantizers``).
        calib_data: an iterable of batches; each batch is the model's inputs (a tensor, or a
            tuple whose first ``arity`` items are the inputs).
        arity: the number of positional model inputs.
        progress: show a tqdm bar (silent when stderr is not a terminal).
        record: keeps the float layer outputs of the batches for ``discrepancy(...,
            reference=record)``, which then runs only the quantized side on them.

    Raises:
        CalibrationError: empty data, or a batch with NaN/Inf (naming the batch index).
    """
    all_quantizers = quantizers(gm)
    device = model_device(gm)
    deferred = _deferred_histograms(device)
    for quantizer in all_quantizers.values():
        quantizer.observe()
        quantizer.observer.deferred = deferred
        if device is not None:
            quantizer.to(device)
    was_training = gm.training
    gm.eval()
    forward = record.module(gm, device) if record is not None else gm
    seen = 0
    try:
        with torch.no_grad():
            for index, batch in enumerate(progress_bar(calib_data, "calibrate", progress)):
                args = model_args(batch, arity)
                _check_finite(args, index)
                if record is not None:
                    record.start(args)
                forward(*args)
                if deferred is not None:
                    deferred.flush()
                if record is not None:
                    record.finish(gm)
                seen += 1
    finally:
        gm.train(was_training)
        for quantizer in all_quantizers.values():
            quantizer.observer.deferred = None
    if seen == 0:
        raise CalibrationError("calib_data yielded no batch; give at least one batch of model inputs")
    for name, quantizer in all_quantizers.items():
        if quantizer.observer.batches == 0:
            raise CalibrationError(
                f"quantizer {name!r} saw no data during calibration: its layer did not run on "
                "calib_data (a branch the data never takes?); skip the layer with QuantConfig(skip=...)"
            )
    finish_calibrations(all_quantizers.values())
    return gm
