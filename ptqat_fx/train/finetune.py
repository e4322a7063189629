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
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import fx, nn

from .frozen_parts import train_with_frozen_parts_in_eval
from ..model_inputs import model_args
from .distill import distillation_loss
from ..errors import ConfigError, InputError
from ..progress import progress_bar
from ..meta import num_inputs
from ..runtime.quantizer import quantizers, step_sizes
from .checkpoint import Position, batches_from, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..checks import require_quantized
from ..errors import NonFiniteError

# Learned LSQ step sizes are clamped to at least this after every optimizer step: a large
# learning rate must not make a step zero or negative (which would flip or collapse the grid).
MIN_STEP_SIZE = 1e-8
# ... and to within this factor of their value before the step. Adam moves every parameter by
# about lr whatever its size, so a step size below lr (a softmax's 5e-4, an activation of 1e-5)
# would be sent to the floor or grown 100x by one step, rounding its whole tensor to zero; a
# step size of ordinary size moves by a small fraction of itself and is not affected.
MAX_STEP_SIZE_FACTOR = 2.0
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, torch.bfloat16: torch.bfloat16, torch.float16: torch.float16}


@dataclass
class History:
    """What a ``finetune`` run did: the loss of every optimizer step, the indices of the batches
    skipped as non-finite (``on_nonfinite="skip"``), wall time, and the peak CUDA memory
    allocated during training (None on other devices)."""

    loss: list[float] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
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


def _targets(batch: Any, arity: int, index: int) -> tuple:
    """The items of batch ``index`` after the model inputs: what ``loss(outputs, *targets)`` takes."""
    if isinstance(batch, (tuple, list)) and len(batch) > arity:
        return tuple(batch[arity:])
    raise InputError(
        f"batch {index} holds only the model input(s), but loss(outputs, targets) needs targets after "
        f"them: yield (inputs..., targets), or pass loss_takes='batch' for loss(outputs, batch)"
    )


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite, in one synchronisation: the largest
    magnitude of each (``_foreach_norm`` of order inf, a few fused kernels however many tensors
    there are) is inf or NaN exactly when the tensor holds one. One check per tensor would launch
    a kernel per parameter on every step, which costs small models more than their forward."""
    filled = [t.detach() for t in tensors if t.numel()]  # the inf norm of an empty tensor is undefined
    if not filled:
        return True
    return bool(torch.stack(torch._foreach_norm(filled, float("inf"))).isfinite().all())


def _nonfinite(value: torch.Tensor, params: list[nn.Parameter], names: dict[int, str], grads: bool) -> str | None:
    """What is not finite: the loss, or (``grads``) the first non-finite gradient; None when all are."""
    if not torch.isfinite(value.detach()).all():
        return f"the loss is {value.item()}"
    if grads:
        with_grad = [p for p in params if p.grad is not None]
        if with_grad and not _all_finite([p.grad for p in with_grad]):
            culprit = next(p for p in with_grad if not p.grad.isfinite().all())
            return f"the gradient of {names[id(culprit)]!r} is not finite"
    return None


def _checked_step(opt: torch.optim.Optimizer, scaler: Any, params: list[nn.Parameter], scales: list[nn.Parameter],
                  names: dict[int, str]) -> str | None:
    """``opt.step()``, then step sizes clamped to within ``MAX_STEP_SIZE_FACTOR`` of their value
    before it and to at least ``MIN_STEP_SIZE``; a step that makes a parameter non-finite (a
    finite but huge update) is undone, and what went wrong is returned."""
    with torch.no_grad():
        before = torch._foreach_mul([p.detach() for p in params], 1.0)
        scales_before = torch._foreach_mul([s.detach() for s in scales], 1.0) if scales else []
    scaler.step(opt)
    scaler.update()
    with torch.no_grad():
        if scales:
            torch._foreach_maximum_(scales, torch._foreach_div(scales_before, MAX_STEP_SIZE_FACTOR))
            torch._foreach_minimum_(scales, torch._foreach_mul(scales_before, MAX_STEP_SIZE_FACTOR))
            torch._foreach_clamp_min_(scales, MIN_STEP_SIZE)
        if _all_finite(params):
            return None
        culprit = next(p for p in params if not p.isfinite().all())
        for p, old in zip(params, before):
            p.copy_(old)
    return f"the optimizer step made {names[id(culprit)]!r} non-finite (undone)"


def _resume(path: str | os.PathLike, qmodel: nn.Module, opt: torch.optim.Optimizer, scaler: Any, schedule: Any,
            run: dict[str, Any], history: History) -> Position:
    state = load_checkpoint(path)
    if state["run"] != run:
        raise ConfigError(
            f"resume={os.fspath(path)!r} was written by a run with {state['run']}, not {run}: resume with "
            "the same epochs, steps and trainable parameters"
        )
    qmodel.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    if schedule is not None:
        schedule.load_state_dict(state["schedule"])
    history.loss, history.skipped = list(state["history"]["loss"]), list(state["history"]["skipped"])
    set_rng_state(state["rng"])
    return Position(**state["position"])


def _save(path: str | os.PathLike, qmodel: nn.Module, opt: torch.optim.Optimizer, scaler: Any, schedule: Any,
          run: dict[str, Any], history: History, position: Position) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    save_checkpoint(path, {
        "model": qmodel.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
        "schedule": None if schedule is None else schedule.state_dict(), "rng": rng_state(), "run": run,
        "history": {"loss": history.loss, "skipped": history.skipped}, "position": vars(position),
    })


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
    loss: Callable[..., torch.Tensor] | None = None,
    loss_takes: Literal["targets", "batch"] = "targets",
    teacher: nn.Module | None = None,
    epochs: int = 1,
    steps: int | None = None,
    lr: float = 1e-4,
    scale_lr: float | None = None,
    optimizer: torch.optim.Optimizer | Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None = None,
    schedule: Callable[[torch.optim.Optimizer], Any] | None = None,
    amp: str | torch.dtype | None = None,
    compile: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
    inputs: int | None = None,
    on_nonfinite: Literal["raise", "skip"] = "raise",
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: str | os.PathLike | None = None,
) -> History:
    """Fine-tune the trainable parameters of ``qmodel`` in place; returns a ``History``.

    Args:
        qmodel: a model from ``ptqat_fx.quantize`` (or ``load``).
        data: iterable of batches: tensors, or tuples whose first ``inputs`` items are the model
            inputs and the rest the targets. Under torchrun, each rank's own shard. A one-shot
            iterator (a generator) is read once: ``epochs > 1`` is refused.
        loss: a criterion ``loss(outputs, *targets) -> scalar`` (``nn.CrossEntropyLoss()`` on an
            ``(x, y)`` loader), the targets being the batch items after the inputs; with
            ``loss_takes="batch"``, ``loss(outputs, batch)`` with the batch as the data yielded it.
        teacher: the float model; without ``loss``, the loss is the MSE between ``qmodel``'s
            and the teacher's outputs (nested tuples/dicts allowed), the teacher in eval mode.
        epochs: passes over ``data``; ignored when ``steps`` is given.
        steps: exactly this many batches, cycling through ``data``.
        lr: learning rate of weights and biases (and of step sizes unless ``scale_lr``).
        scale_lr: learning rate of the LSQ step sizes.
        optimizer: an optimizer over the trainable parameters, or a callable building one
            from the parameter groups (which carry ``lr`` and ``scale_lr``); Adam by default.
        schedule: a callable building an LR scheduler from the optimizer, stepped after every
            optimizer step (``lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10)``).
        amp: ``"bf16"`` or ``"fp16"`` autocast (fp16 with a gradient scaler, which itself skips
            steps whose scaled gradients overflow), or None.
        compile: train through ``torch.compile`` of the (DDP-wrapped) model.
        device: where to train; the device of ``qmodel``'s parameters by default. ``qmodel``
            and ``teacher`` are moved there.
        progress: tqdm bar with the loss (its total is known for ``steps`` or a sized ``data``).
        inputs: number of positional model inputs in a batch; read from ``qmodel.meta``.
        on_nonfinite: ``"raise"``: a non-finite loss or gradient (checked before the optimizer
            step) or parameter (checked after it; the step is undone) raises ``NonFiniteError``
            naming the step and batch, with the model at its last finite state; ``"skip"``:
            such a step changes nothing, and its index is recorded in ``History.skipped``.
        checkpoint / checkpoint_every: write a checkpoint (``checkpoint.py``) to this path every
            ``checkpoint_every`` batches and at the end.
        resume: continue the run whose checkpoint is at this path, with the same ``qmodel``,
            data and arguments; the result is the one the uninterrupted run reaches.

    LSQ step sizes are clamped after every optimizer step to within a factor
    ``MAX_STEP_SIZE_FACTOR`` (2) of their previous value and to at least ``MIN_STEP_SIZE``, so a
    learning rate large against a step size (Adam moves each by about ``lr``) cannot make it
    zero or negative or collapse its grid in one step.

    Raises:
        InputError: a model ``quantize`` did not make, nothing trainable, a batch of the wrong
            structure (names the batch), a teacher whose outputs differ in structure.
        ConfigError: neither or both of ``loss`` and ``teacher``; bad ``amp``, ``optimizer``,
            ``loss_takes``, ``on_nonfinite`` or checkpoint arguments; a one-shot iterator with
            ``epochs > 1``; a checkpoint from another run.
        NonFiniteError: see ``on_nonfinite``.
        SerializationError: ``resume`` is not a readable checkpoint.
    """
    if inputs is None:
        require_quantized(qmodel, "finetune")
    if (loss is None) == (teacher is None):
        raise ConfigError("finetune needs exactly one of loss=(outputs, targets) -> loss and teacher=<float model>")
    if loss_takes not in ("targets", "batch") or on_nonfinite not in ("raise", "skip"):
        raise ConfigError(f"loss_takes={loss_takes!r}, on_nonfinite={on_nonfinite!r}: use 'targets' or 'batch', and 'raise' or 'skip'")
    if epochs < 1 or (steps is not None and steps < 1):
        raise ConfigError(f"epochs={epochs}, steps={steps}: both must be >= 1 (steps may be None)")
    if isinstance(data, Iterator) and steps is None and epochs > 1:
        raise ConfigError(
            f"data is a one-shot {type(data).__name__}, which cannot be read for epochs={epochs}: pass a list "
            "or a DataLoader, or use steps=<number of batches> with epochs=1"
        )
    if (checkpoint is None) != (checkpoint_every is None) or (checkpoint_every is not None and checkpoint_every < 1):
        raise ConfigError(f"checkpoint={checkpoint!r}, checkpoint_every={checkpoint_every!r}: give both, every >= 1")
    arity = _num_inputs(qmodel, inputs)
    amp_dtype = _amp_dtype(amp)
    groups = _param_groups(qmodel, lr, scale_lr)
    device = torch.device(device) if device is not None else next(qmodel.parameters()).device
    qmodel.to(device)
    if teacher is not None:
        teacher_was_training = teacher.training
        teacher.to(device).eval()
    opt = _build_optimizer(optimizer, groups, lr)
    lr_schedule = schedule(opt) if schedule is not None else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    names = {id(p): name for name, p in qmodel.named_parameters()}
    params = [p for group in opt.param_groups for p in group["params"] if p.requires_grad]
    scales = [p for group in groups if group["name"] == "scales" for p in group["params"]]
    run = {"epochs": epochs, "steps": steps, "trainable": [names[id(p)] for p in params]}
    history = History()
    position = _resume(resume, qmodel, opt, scaler, lr_schedule, run, history) if resume is not None else Position()
    was_training = qmodel.training
    hooks: list = []
    train_with_frozen_parts_in_eval(qmodel)  # BatchNorm statistics / dropout of frozen parts as in eval
    train_model = _distributed(qmodel, device, hooks)
    if compile:
        train_model = torch.compile(train_model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    total = steps if steps is not None else len(data) * epochs if isinstance(data, Sized) else None
    bar = progress_bar(batches_from(data, epochs, steps, position), "finetune", progress, total=total, initial=position.step)
    try:
        for batch in bar:
            index = position.step
            batch = _to_device(batch, device)
            args = _batch_inputs(batch, arity, index)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                outputs = train_model(*args)
                if teacher is not None:
                    with torch.no_grad():
                        target = teacher(*args)
                    value = distillation_loss(outputs, target)
                elif loss_takes == "batch":
                    value = loss(outputs, batch)
                else:
                    value = loss(outputs, *_targets(batch, arity, index))
            opt.zero_grad(set_to_none=True)
            scaler.scale(value).backward()
            problem = _nonfinite(value, params, names, grads=not scaler.is_enabled())
            if problem is None:
                problem = _checked_step(opt, scaler, params, scales, names)
            if problem is not None:
                opt.zero_grad(set_to_none=True)
                if on_nonfinite == "raise":
                    raise NonFiniteError(
                        f"finetune step {index} (batch {position.offset} of epoch {position.epoch}): {problem}; "
                        f"the model is left as it was after step {index - 1}. Check that batch, lower lr, or "
                        "pass on_nonfinite='skip' to skip such steps"
                    )
                history.skipped.append(index)
            else:
                if lr_schedule is not None:
                    lr_schedule.step()
                history.loss.append(value.item())
                bar.set_postfix(loss=f"{history.loss[-1]:.4g}", refresh=False)
            position.step += 1
            position.offset += 1
            if checkpoint is not None and position.step % checkpoint_every == 0:
                _save(checkpoint, qmodel, opt, scaler, lr_schedule, run, history, position)
        if checkpoint is not None and position.step % checkpoint_every:
            _save(checkpoint, qmodel, opt, scaler, lr_schedule, run, history, position)
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
