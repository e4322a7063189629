"""Checks at the top of the public functions that take a model: it was quantized, and in float32.

Each raises ``InputError`` naming the culprit and the fix, before the function fails deep inside.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from .errors import InputError
from .quantizer import FakeQuantizer


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
