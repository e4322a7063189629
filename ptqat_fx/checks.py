"""Checks at the top of the public functions: the model was quantized and is float32, the
arguments of ``quantize`` are of the kinds it takes, and its calibration batches match
``example_inputs``; and warnings about a ``quantize`` result that cannot be what was meant.

Each error names the culprit and the fix, before the function would fail deep inside.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import fx, nn

from .model_inputs import model_args
from .config import QuantConfig, Select
from .errors import ConfigError, InputError
from .layer_spec import layer_specs
from .runtime.quantizer import FakeQuantizer


def require_quantized(model: nn.Module, verb: str) -> None:
    """Raise unless ``model`` came out of ``ptqat_fx.quantize`` (or a pass of it, ``load``, ``convert``)."""
    if isinstance(model, fx.GraphModule) and (
        any(key.startswith("ptqat_") for key in model.meta)
        or any(isinstance(m, FakeQuantizer) for m in model.modules())
        or any(key.startswith("ptqat_") for node in model.graph.nodes for key in node.meta)
    ):
        return
    raise InputError(
        f"{verb} was given a {type(model).__name__} that ptqat_fx.quantize never made (it holds no "
        f"quantizer): quantize it first, qmodel = ptqat_fx.quantize(model, example_inputs, calib_data), "
        f"and pass qmodel to {verb}"
    )


def require_float32(model: nn.Module, verb: str) -> None:
    """Raise when a floating parameter or buffer of ``model`` is float16 or bfloat16."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.dtype in (torch.float16, torch.bfloat16):
            raise InputError(
                f"{verb} needs a float32 model, but {name!r} is {tensor.dtype}: call model.float() first "
                "(train in half precision with finetune(amp='bf16') instead of converting the model)"
            )


def require_quantized_float32(model: nn.Module, verb: str) -> None:
    """``require_quantized`` and ``require_float32``: what ``convert`` and ``export_onnx`` need."""
    require_quantized(model, verb)
    require_float32(model, verb)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, dict):
        return f"a dict with keys {sorted(map(str, value))[:6]}"
    return f"a {type(value).__name__}"


class CheckedBatches:
    """Calibration batches checked as they are read: each must be what ``example_inputs`` showed
    (the same dtypes, the same shapes but for the batch dimension), or dicts with ``example_kwargs``."""

    def __init__(self, batches: Iterable[Any], example_inputs: tuple, keyword: bool) -> None:
        self.batches, self.example_inputs, self.keyword = batches, example_inputs, keyword

    def __len__(self) -> int:
        return len(self.batches)  # TypeError for unsized data, as tqdm expects

    def __iter__(self) -> Iterator[Any]:
        for index, batch in enumerate(self.batches):
            self._check(index, batch)
            yield batch

    def _check(self, index: int, batch: Any) -> None:
        where = f"calib_data batch {index}"
        if batch is None:
            raise InputError(f"{where} is None: every batch must hold the model inputs (a tensor, or a tuple (x, ...))")
        if isinstance(batch, dict) != self.keyword:
            fix = ("pass example_kwargs=<the forward's keyword inputs> to quantize, or yield tuples (x, ...)"
                   if isinstance(batch, dict) else "with example_kwargs, yield dicts of the forward's inputs by name")
            raise InputError(f"{where} is {_describe(batch)}: {fix}")
        if self.keyword:
            return
        given = model_args(batch, len(self.example_inputs))
        for position, (value, example) in enumerate(zip(given, self.example_inputs)):
            if isinstance(example, torch.Tensor) and (
                not isinstance(value, torch.Tensor) or value.dtype != example.dtype
                or value.shape[1:] != example.shape[1:] or value.dim() != example.dim()
            ):
                raise InputError(
                    f"{where}, input {position}, is {_describe(value)}, but example_inputs[{position}] is "
                    f"{_describe(example)}: calibration batches must match example_inputs in dtype and in "
                    "every dimension but the first (the batch size)"
                )


def quantize_arguments(
    calib_data: Any, config: Any, select: Any, example_inputs: tuple, example_kwargs: dict[str, Any] | None
) -> tuple[Any, QuantConfig, Select | None]:
    """``quantize``'s arguments as it needs them, or a clear error: ``config`` and ``select`` may be
    given as dicts or (select) a strategy name; ``calib_data`` comes back checked batch by batch."""
    if isinstance(config, dict):
        config = _dataclass_from(QuantConfig, config, "config")
    if config is not None and not isinstance(config, QuantConfig):
        raise ConfigError(f"config={config!r}: pass a QuantConfig (or a dict of its fields), e.g. QuantConfig(w_bits=4)")
    if isinstance(select, str):
        select = Select(select)
    elif isinstance(select, dict):
        select = _dataclass_from(Select, select, "select")
    if select is not None and not isinstance(select, Select):
        raise ConfigError(f"select={select!r}: pass a Select, a strategy name ('small', 'all'...) or None")
    if isinstance(calib_data, torch.Tensor):
        raise InputError(
            f"calib_data is one tensor of shape {tuple(calib_data.shape)}; quantize iterates over batches, and "
            "iterating a tensor gives its single samples: pass [calib_data] for one batch, or a list or "
            "DataLoader of batches (list(calib_data.split(32)))"
        )
    if calib_data is not None:
        if isinstance(calib_data, Iterator):
            calib_data = list(calib_data)  # read once here; quantize reads it twice
        calib_data = CheckedBatches(calib_data, example_inputs, bool(example_kwargs))
    return calib_data, config or QuantConfig(), select


def _dataclass_from(cls: type, fields: dict[str, Any], argument: str) -> Any:
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(
            f"{argument}={fields!r}: {unknown} are not {cls.__name__} fields; choose from "
            f"{[f.name for f in dataclasses.fields(cls)]}"
        )
    return cls(**fields)


_KINDS = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear", "linear_transposed", "matmul"}


def warn_about_result(model: nn.Module, gm: fx.GraphModule, config: QuantConfig, select: Select | None) -> None:
    """Warn (naming the option) about a ``skip`` pattern that matched nothing, and about a result
    in which nothing is trainable although a selection was asked for."""
    names = {path for path, _ in model.named_modules()} | {node.name for node in gm.graph.nodes}
    for pattern in config.skip:
        if pattern not in _KINDS and not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            warnings.warn(
                f"QuantConfig.skip pattern {pattern!r} matches no module path and no layer kind of the "
                f"{type(model).__name__}; check the spelling (paths as in model.named_modules(), kinds such as "
                "'linear', 'conv2d')", stacklevel=3,
            )
    if select is None or select.strategy == "none" or any(p.requires_grad for p in gm.parameters()):
        return
    if not layer_specs(gm):
        cause = f"QuantConfig.skip={config.skip!r} leaves no quantizable layer"
    elif select.theta is not None:
        cause = f"Select.theta={select.theta} selects no layer (every discrepancy is on the other side of it)"
    elif select.param_budget is not None:
        cause = f"Select.param_budget={select.param_budget} is smaller than the smallest layer"
    else:
        cause = "the selection chose no layer"
    warnings.warn(f"nothing in the quantized model is trainable: {cause}; finetune would have nothing to train",
                  stacklevel=3)
