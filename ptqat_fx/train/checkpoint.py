"""Fine-tune checkpoints: everything a run needs to continue to the result it would have reached.

A checkpoint holds the model's state dict, the optimizer's, the gradient scaler's and the LR
schedule's, every RNG state (torch CPU and CUDA, Python ``random``, NumPy), the position in the
data (step, epoch, batches read in the epoch, and the RNG state at the epoch's start, from
which the data's iterator is recreated: a shuffling DataLoader draws its order there), and the
history so far. It is written atomically (a temporary file in the same folder, fsync, then
``os.replace``), so a run killed while writing leaves the previous checkpoint intact, and read
with ``torch.load(weights_only=True)``: tensors and plain values only, no pickled code.
"""
from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..digest import read_tensors_only
from ..errors import InputError, SerializationError

FORMAT = "ptqat-fx.finetune-checkpoint"
VERSION = 1


@dataclass
class Position:
    """Where a run is: ``step`` batches consumed in all, ``offset`` of them in epoch ``epoch``."""

    step: int = 0
    epoch: int = 0
    offset: int = 0
    epoch_rng: dict[str, Any] | None = field(default=None, repr=False)


def rng_state() -> dict[str, Any]:
    """Every global RNG's state, as tensors and plain values (loadable with weights_only)."""
    version, python_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(python_state), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: readers see the old file or the new one, never half."""
    path = os.fspath(path)
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as file:
        torch.save({"format": FORMAT, "version": VERSION, **state}, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The state written by ``save_checkpoint``; SerializationError when it is not one."""
    path = os.fspath(path)
    state = read_tensors_only(path, "finetune checkpoint")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise SerializationError(f"{path!r} was not written by finetune(checkpoint=...)")
    if state.get("version") != VERSION:
        raise SerializationError(
            f"{path!r} has checkpoint version {state.get('version')!r}; this ptqat-fx reads {VERSION}: "
            "resume it with the ptqat-fx that wrote it"
        )
    return state


_END = object()


def batches_from(data: Iterable[Any], epochs: int, steps: int | None, position: Position) -> Iterator[Any]:
    """The batches of ``epochs`` passes over ``data`` (or of ``steps`` batches, cycling), from
    ``position`` on; the caller advances ``position.step`` and ``position.offset`` per batch.

    Each pass records the RNG state before it calls ``iter(data)``; resuming mid-pass restores
    that state, recreates the iterator (the same shuffled order), skips the batches already read
    and then restores the RNG state of the moment the checkpoint was written.
    """
    one_shot = isinstance(data, Iterator)
    while (position.epoch < epochs) if steps is None else (position.step < steps):
        resuming = position.offset > 0
        if resuming:
            now = rng_state()
            set_rng_state(position.epoch_rng)
        else:
            position.epoch_rng = rng_state()
        iterator = iter(data)
        for _ in range(position.offset):
            if next(iterator, _END) is _END:
                raise InputError(
                    f"resume: the data has fewer than the {position.offset} batches per epoch it had when "
                    "the checkpoint was written; pass the same data as the interrupted run"
                )
        if resuming:
            set_rng_state(now)
        empty = not resuming
        for batch in iterator:
            empty = False
            yield batch
            if steps is not None and position.step >= steps:
                return
        if empty:
            if one_shot and position.step:
                raise InputError(
                    f"the data, a one-shot iterator, ran out after {position.step} batches; pass a list or a "
                    "DataLoader so that finetune can pass over it again, or fewer steps"
                )
            raise InputError("the data yielded no batch; pass a non-empty iterable of batches")
        position.epoch += 1
        position.offset = 0
