"""``finetune``: train what the freeze rewrite left trainable, alone or under torchrun/DDP.

    qmodel = ptqat_fx.quantize(model, (x,), calib_data)
    history = ptqat_fx.finetune(qmodel, train_loader, teacher=model, epochs=1, amp="bf16")

The optimizer sees only parameters with ``requires_grad`` (after ``quantize`` with a
selection: the selected layers' weights, biases and step sizes); the LSQ step sizes
(``*.scale``) form their own parameter group with their own learning rate and no weight decay.

Under ``torchrun`` (a process group initialised by the caller, each rank given its own shard
of the data) the model is wrapped in ``DistributedDataParallel``: DDP builds its gradient
buckets from trainable parameters only, and every trainable parameter is used in every step,
so no ``find_unused_parameters`` is needed; gradients are averaged, so N ranks with batches of
B match one process with batches of N*B when the loss is a mean over the batch (activation
step-size gradients are rescaled for that: see ``_distributed``).
"""
from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import fx, nn

from ..model_inputs import model_args
from .distill import distillation_loss
from ..errors import ConfigError, InputError
from ..progress import progress_bar
from ..meta import num_inputs
from ..runtime.quantizer import quantizers, step_sizes

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, torch.bfloat16: torch.bfloat16, torch.float16: torch.float16}


@dataclass
class History:
    """What a ``finetune`` run did: the loss of every step, wall time, and the peak CUDA
    memory allocated during training (None on other devices)."""

    loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    peak_memory_bytes: int | None = None

    @property
    def steps(self) -> int:
        return len(self.loss)


def _num_inputs(qmodel: nn.Module, inputs: int | None) -> int:
    if inputs is not None:
        return inputs
    if isinstance(qmodel, fx.GraphModule) and num_inputs(qmodel) is not None:
        return num_inputs(qmodel)
    raise InputError(
        f"finetune cannot tell how many of each batch's items the {type(qmodel).__name__} takes as inputs "
        "(it was not made by ptqat_fx.quantize); pass inputs=<number of positional model inputs>"
    )


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _batch_inputs(batch: Any, arity: int, index: int) -> tuple:
    """The model inputs in batch number ``index``, or an InputError that names the batch."""
    if isinstance(batch, torch.Tensor) and arity == 1:
        return (batch,)
    if isinstance(batch, (tuple, list)) and len(batch) >= arity:
        return model_args(batch, arity)
    size = f" of {len(batch)} items" if isinstance(batch, (tuple, list, dict)) else ""
    raise InputError(
        f"batch {index} of the data is a {type(batch).__name__}{size}, but the model takes {arity} "
        f"positional input(s): yield a tensor (one input) or a tuple whose first {arity} items are the "
        "inputs (labels may follow)"
    )


def _param_groups(model: nn.Module, lr: float, scale_lr: float | None) -> list[dict[str, Any]]:
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise InputError(
            f"the {type(model).__name__} has no trainable parameter: quantize it with a selection that "
            "trains something (Select('small'), Select('all')); Select('none') is PTQ, with nothing to fine-tune"
        )
    steps = step_sizes(model)
    weights = [p for name, p in trainable if id(p) not in steps]
    scales = [p for name, p in trainable if id(p) in steps]
    groups = [{"params": weights, "lr": lr, "name": "weights"}] if weights else []
    if scales:
        groups.append({"params": scales, "lr": lr if scale_lr is None else scale_lr, "weight_decay": 0.0, "name": "scales"})
    return groups


def _build_optimizer(
    optimizer: torch.optim.Optimizer | Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None,
    groups: list[dict[str, Any]],
    lr: float,
) -> torch.optim.Optimizer:
    if optimizer is None:
        return torch.optim.Adam(groups, lr=lr)
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if callable(optimizer):
        return optimizer(groups)
    raise ConfigError(
        f"optimizer={optimizer!r}: pass a torch.optim.Optimizer, or a callable that builds one from "
        "parameter groups (lambda groups: torch.optim.SGD(groups, lr=0.01, momentum=0.9))"
    )


def _amp_dtype(amp: str | torch.dtype | None) -> torch.dtype | None:
    if amp is None:
        return None
    if amp not in _AMP_DTYPES:
        raise ConfigError(f"amp={amp!r}: use None, 'bf16' or 'fp16' (or torch.bfloat16 / torch.float16)")
    return _AMP_DTYPES[amp]


def _steps(data: Iterable[Any], epochs: int, steps: int | None) -> Iterator[tuple[int, Any]]:
    """(index, batch) for ``epochs`` passes, or for exactly ``steps`` batches, cycling the data."""
    index = 0
    for _ in range(epochs if steps is None else steps):
        empty = True
        for batch in data:
            empty = False
            if steps is not None and index >= steps:
                return
            yield index, batch
            index += 1
        if empty:
            raise InputError("the data yielded no batch; pass a non-empty iterable of batches")
        if steps is not None and index >= steps:
            return


def _distributed(model: nn.Module, device: torch.device, hooks: list) -> nn.Module:
    """``model`` wrapped in DDP when a process group of several ranks runs; else ``model``.

    LSQ scales a per-tensor (activation) step's gradient by ``1 / sqrt(N * qmax)`` with N the
    elements of the tensor, which on each rank is 1/world of the global batch's: those step
    gradients are scaled by ``1 / sqrt(world)`` (hooks appended to ``hooks``), so that N ranks
    compute what one process computes on the global batch.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return model
    per_batch = 1.0 / dist.get_world_size() ** 0.5
    for quantizer in quantizers(model).values():
        if quantizer.channel_axis is None and quantizer.scale.requires_grad:
            hooks.append(quantizer.scale.register_hook(lambda grad: grad * per_batch))
    device_ids = [device] if device.type == "cuda" else None
    # Buffers are constants (frozen dequantized weights): synchronised once when DDP starts, not
    # every forward. torch >= 2.13 names the option forward_sync_buffers.
    ddp = nn.parallel.DistributedDataParallel
    option = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else "broadcast_buffers"
    return ddp(model, device_ids=device_ids, **{option: False})


def finetune(
    qmodel: nn.Module,
    data: Iterable[Any],
    *,
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    teacher: nn.Module | None = None,
    epochs: int = 1,
    steps: int | None = None,
    lr: float = 1e-4,
    scale_lr: float | None = None,
    optimizer: torch.optim.Optimizer | Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None = None,
    amp: str | torch.dtype | None = None,
    compile: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
    inputs: int | None = None,
) -> History:
    """Fine-tune the trainable parameters of ``qmodel`` in place; returns a ``History``.

    Args:
        qmodel: a model from ``ptqat_fx.quantize`` (or any module with trainable parameters,
            given ``inputs``).
        data: iterable of batches: tensors, or tuples whose first ``inputs`` items are the model
            inputs (labels after them reach ``loss`` through the batch). Under torchrun, each
            rank's own shard.
        loss: ``(outputs, batch) -> scalar``; batch is as the data yielded it, on ``device``.
        teacher: the float model; without ``loss``, the loss is the MSE between ``qmodel``'s
            and the teacher's outputs (nested tuples/dicts allowed), the teacher in eval mode.
        epochs: passes over ``data``; ignored when ``steps`` is given.
        steps: exactly this many optimizer steps, cycling through ``data``.
        lr: learning rate of weights and biases (and of step sizes unless ``scale_lr``).
        scale_lr: learning rate of the LSQ step sizes.
        optimizer: an optimizer over the trainable parameters, or a callable building one
            from the parameter groups (which carry ``lr`` and ``scale_lr``); Adam by default.
        amp: ``"bf16"`` or ``"fp16"`` autocast (fp16 with a gradient scaler), or None.
        compile: train through ``torch.compile`` of the (DDP-wrapped) model.
        device: where to train; the device of ``qmodel``'s parameters by default. ``qmodel``
            and ``teacher`` are moved there.
        progress: tqdm bar with the loss.
        inputs: number of positional model inputs in a batch; read from ``qmodel.meta`` when
            ``quantize`` made it.

    Raises:
        InputError: nothing trainable, a batch of the wrong structure (names the batch), a
            teacher whose outputs differ in structure (names the path).
        ConfigError: neither or both of ``loss`` and ``teacher``, bad ``amp`` or ``optimizer``.
    """
    if (loss is None) == (teacher is None):
        raise ConfigError("finetune needs exactly one of loss=(outputs, batch) -> loss and teacher=<float model>")
    if epochs < 1 or (steps is not None and steps < 1):
        raise ConfigError(f"epochs={epochs}, steps={steps}: both must be >= 1 (steps may be None)")
    arity = _num_inputs(qmodel, inputs)
    amp_dtype = _amp_dtype(amp)
    groups = _param_groups(qmodel, lr, scale_lr)
    device = torch.device(device) if device is not None else next(qmodel.parameters()).device
    qmodel.to(device)
    if teacher is not None:
        teacher_was_training = teacher.training
        teacher.to(device).eval()
    opt = _build_optimizer(optimizer, groups, lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    was_training = qmodel.training
    hooks: list = []
    train_model = _distributed(qmodel.train(), device, hooks)
    if compile:
        train_model = torch.compile(train_model)
    history = History()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    bar = progress_bar(_steps(data, epochs, steps), "finetune", progress, total=steps)
    try:
        for index, batch in bar:
            batch = _to_device(batch, device)
            args = _batch_inputs(batch, arity, index)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                outputs = train_model(*args)
                if teacher is not None:
                    with torch.no_grad():
                        target = teacher(*args)
                    value = distillation_loss(outputs, target)
                else:
                    value = loss(outputs, batch)
            opt.zero_grad(set_to_none=True)
            scaler.scale(value).backward()
            scaler.step(opt)
            scaler.update()
            history.loss.append(value.item())
            bar.set_postfix(loss=f"{history.loss[-1]:.4g}", refresh=False)
    finally:
        for hook in hooks:
            hook.remove()
        qmodel.train(was_training)
        if teacher is not None:
            teacher.train(teacher_was_training)
    history.seconds = time.perf_counter() - start
    if device.type == "cuda":
        history.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    return history
