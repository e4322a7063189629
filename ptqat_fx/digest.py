"""SHA-256 digests that make a saved file's corruption or edit a clear error instead of a
silently different model.

A digest protects against accidents (a flipped bit, a truncated copy, a hand edit of a field);
it is not a signature: whoever can write the file can recompute it. Safety against crafted files
comes from ``untrusted`` (no name from a file reaches generated source), not from here.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

import torch

from .errors import SerializationError


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (bf16, packed int4 and bool included)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    data = flat.view(torch.uint8) if flat.numel() else flat.new_empty(0, dtype=torch.uint8)
    header = f"{flat.dtype}|{tuple(tensor.shape)}|".encode()
    return hashlib.sha256(header + data.numpy().tobytes()).hexdigest()


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def digests(text: str, tensors: dict[str, torch.Tensor]) -> dict[str, object]:
    """The digests ``verify`` checks: one of ``text`` and one per tensor, by name."""
    return {"description": text_digest(text), "tensors": {name: tensor_digest(t) for name, t in tensors.items()}}


def verify(expected: object, text: str, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raise SerializationError naming the first part of a file that does not match its digest."""
    if not isinstance(expected, dict) or not isinstance(expected.get("tensors"), dict):
        raise SerializationError(f"{where}: the integrity digest is missing or unreadable; the file is corrupt")
    if expected.get("description") != text_digest(text):
        raise SerializationError(
            f"{where}: the description (graph, modules, bits, metadata) does not match its SHA-256 digest; "
            "the file was edited or corrupted: save the model again"
        )
    if set(expected["tensors"]) != set(tensors):
        missing = sorted(set(expected["tensors"]) ^ set(tensors))[:3]
        raise SerializationError(f"{where}: tensors {missing} are missing or extra; the file is corrupt")
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or expected["tensors"][name] != tensor_digest(tensor):
            raise SerializationError(
                f"{where}: tensor {name!r} does not match its SHA-256 digest; the file was edited or "
                "corrupted: save the model again"
            )


def read_tensors_only(path: str | os.PathLike, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU: tensors and plain values, never pickled code.

    Raises:
        SerializationError: the file is not a readable ``what`` (truncated, corrupted, or holding
            pickled objects); FileNotFoundError passes through.
    """
    try:
        return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise SerializationError(
            f"{os.fspath(path)!r} is not a readable {what} (truncated or corrupted?, or holding pickled "
            f"code): {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from error
