"""``quantize``: the PTQAT pipeline as a composition of the public passes."""
from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from .runtime.attention import unfused_copy
from .model_inputs import KeywordBatches, bind_positional
from .checks import quantize_arguments, warn_about_result
from .config import QuantConfig, Select
from .coverage import coverage
from .views.dump.stages import StageDumper
from .errors import InputError
from .meta import set_config, set_num_inputs
from .passes.annotate import annotate
from .passes.calibrate import calibrate
from .passes.discrepancy import discrepancy
from .passes.float_outputs import FloatOutputs
from .passes.fold_bn import fold_bn
from .passes.freeze import freeze
from .passes.insert_quantizers import insert_quantizers
from .passes.quantize_joins import quantize_joins
from .passes.quantize_leaves import quantize_leaves
from .passes.select import select_layers
from .capture import trace


def _check_example_inputs(model: nn.Module, example_inputs: Any, example_kwargs: dict[str, Any]) -> None:
    """Raise InputError unless ``model`` (a copy: eval mode keeps BN statistics untouched)
    runs on ``example_inputs``."""
    if not isinstance(example_inputs, tuple):
        raise InputError(
            f"example_inputs must be a tuple of the model's positional inputs, got "
            f"{type(example_inputs).__name__}; for one tensor write (x,)"
        )
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(*example_inputs, **example_kwargs)
    except Exception as error:
        raise InputError(
            f"the model fails on example_inputs in eager mode ({type(error).__name__}: {error}); "
            "pass inputs the unmodified model accepts"
        ) from error
    finally:
        model.train(was_training)


def quantize(
    model: nn.Module,
    example_inputs: tuple,
    calib_data: Iterable[Any] | None = None,
    config: QuantConfig | None = None,
    select: Select | None = Select(),
    *,
    example_kwargs: dict[str, Any] | None = None,
    leaf_modules: Sequence[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    strict: bool = False,
    progress: bool = True,
    dump_dir: str | Path | None = None,
) -> fx.GraphModule:
    """Quantize ``model`` with PTQAT: a calibrated fake-quant ``GraphModule`` in which only
    the selected layers are trainable.

    The stages are the public passes ``trace -> fold_bn -> annotate -> insert_quantizers ->
    calibrate -> discrepancy -> select_layers -> freeze``; each can be called on its own.
    ``model`` and its parameters are not touched: the pipeline works on a deep copy.

    Args:
        model: any ``nn.Module`` torch.fx can trace (see ``leaf_modules``).
        example_inputs: a tuple of the model's positional inputs; used to check the model
            runs, and for calibration when ``calib_data`` is None.
        calib_data: iterable of batches for PTQ calibration and the discrepancy analysis:
            tensors, or tuples whose first ``len(example_inputs)`` items are the inputs
            (labels after them are ignored). A one-shot iterator is read into a list.
        config: bits, observers, skipped layers; ``QuantConfig()`` (W4A8) by default.
        select: which layers stay trainable; PTQAT's rule ``Select("small", fraction=0.5)``
            by default (ranked by the discrepancy measured on ``calib_data``). ``None`` stops
            after calibration: every quantizer and parameter trainable, no analysis.
        example_kwargs: keyword inputs of the forward, if it takes any. Then every
            ``calib_data`` batch is a dict of the forward's arguments by name (positional ones
            included), and the returned model takes them by name or position.
        leaf_modules: module classes or paths kept opaque by the tracer.
        concrete_args: forward arguments fixed at trace time. Example inputs holding dicts or
            lists of tensors are traced through, and non-tensor ones fixed, without it.
        strict: raise ``TraceError`` where a module does not trace, instead of running its
            forward eagerly as a nested capture (its children captured as graphs, its
            Conv/Linear layers quantized at module level; ``gm.meta["ptqat_auto_leaves"]``,
            ``coverage(gm)`` lists them). Where plain tracing fails, the graph is specialized
            to the shapes of ``example_inputs`` and refuses other shapes with ``InputError``
            (``capture.specialization(gm)``).
        progress: show progress bars.
        dump_dir: write the graph after every stage to this folder (``01_traced.txt``,
            ``.json``, ``.dot``, ``.svg``, then ``02_bn_folded``...; see ``dump.stages``).

    Returns:
        A GraphModule in fake-quant mode, in the train/eval mode of ``model``.

    Raises:
        InputError, TraceError, CalibrationError, ConfigError.
    """
    calib_data, config, select = quantize_arguments(calib_data, config, select, example_inputs, example_kwargs)
    # A deep copy with nn.MultiheadAttention unfused into Linear layers (runtime.attention).
    working_copy = unfused_copy(model)
    _check_example_inputs(working_copy, example_inputs, example_kwargs or {})
    after = StageDumper(dump_dir)
    gm = after("traced", trace(
        working_copy, leaf_modules=leaf_modules, concrete_args=concrete_args,
        example_inputs=example_inputs, example_kwargs=example_kwargs, auto_leaf=not strict,
    ))
    set_config(gm, config)
    inputs = example_inputs
    if example_kwargs:
        # Keyword inputs become positional ones, in the traced forward's order.
        inputs = bind_positional(inspect.signature(gm.forward), example_inputs, example_kwargs)
    set_num_inputs(gm, len(inputs))  # how finetune() splits batches
    if config.fold_bn:
        gm = after("bn_folded", fold_bn(gm))
    gm = after("annotated", annotate(gm, config))
    gm = insert_quantizers(gm, config)
    gm = quantize_leaves(gm, config, inputs)
    if config.share_join_quantizers:
        gm = quantize_joins(gm, config, inputs)
    after("quantizers_inserted", gm)
    if not coverage(gm).layers:
        warnings.warn(
            f"{type(model).__name__} has no quantizable layer (conv, linear, matmul): the returned "
            "model computes in float; nothing for quantization to do", stacklevel=2,
        )
    data = calib_data if calib_data is not None else [inputs]
    if iter(data) is data:
        # A one-shot iterator: calibration and analysis both read it, so keep its batches.
        data = list(data)
    if example_kwargs and calib_data is not None:
        data = KeywordBatches(data, inspect.signature(gm.forward))
    # Calibration's float layer outputs, so that the analysis runs only the quantized side.
    record = FloatOutputs() if select is not None else None
    gm = after("calibrated", calibrate(gm, data, len(inputs), progress=progress, record=record))
    if select is not None:
        gm = after("analysed", discrepancy(
            gm, data, len(inputs), modes=(select.mode,), metrics=(select.metric,), progress=progress,
            reference=record,
        ))
        # The tapped forward calibration ran is a reference cycle (as every GraphModule is)
        # holding the record: drop its tensors now, not at Python's next full collection.
        record.release()
        gm = after("selected", select_layers(gm, select))
        gm = after("frozen", freeze(gm, select.train_other_params))
    gm.train(model.training)
    warn_about_result(model, gm, config, select)
    return gm
