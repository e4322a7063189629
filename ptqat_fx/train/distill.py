"""Distillation loss between a quantized student's outputs and its float teacher's.

Outputs may be nested tuples, lists and dicts of tensors (a detection head's ``{"boxes": ...,
"scores": ...}``); both sides must have the same structure. The loss is the sum over tensor
leaves of the mean squared error, computed in float32 (under AMP the outputs may be bf16), so
every leaf counts as much as it would alone and a leaf's size does not weight it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InputError


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a Tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    if isinstance(value, dict):
        return f"a dict with keys {sorted(map(str, value))}"
    return f"a {type(value).__name__}"


def paired_leaves(student: Any, teacher: Any, path: str = "output") -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(path, student tensor, teacher tensor) for every tensor leaf of two outputs of one structure.

    Non-tensor leaves (None, numbers, strings) are skipped.

    Raises:
        InputError: the structures or a leaf's shape differ; names the path, e.g. ``output[1]['boxes']``.
    """
    mismatch = InputError(
        f"student and teacher outputs differ at {path}: the student gives {_describe(student)}, the "
        f"teacher {_describe(teacher)}; pass the float model the student was quantized from as teacher, "
        "or a loss callable"
    )
    if isinstance(student, torch.Tensor) or isinstance(teacher, torch.Tensor):
        if not (isinstance(student, torch.Tensor) and isinstance(teacher, torch.Tensor)) or student.shape != teacher.shape:
            raise mismatch
        return [(path, student, teacher)]
    if isinstance(student, (tuple, list)):
        if not isinstance(teacher, (tuple, list)) or len(student) != len(teacher):
            raise mismatch
        return [leaf for i, (s, t) in enumerate(zip(student, teacher)) for leaf in paired_leaves(s, t, f"{path}[{i}]")]
    if isinstance(student, dict):
        if not isinstance(teacher, dict) or set(student) != set(teacher):
            raise mismatch
        return [leaf for key in student for leaf in paired_leaves(student[key], teacher[key], f"{path}[{key!r}]")]
    return []


def distillation_loss(student: Any, teacher: Any) -> torch.Tensor:
    """Sum over tensor leaves of ``mse(student_leaf, teacher_leaf)`` in float32.

    Raises:
        InputError: the outputs differ in structure (names the path) or hold no tensor.
    """
    leaves = paired_leaves(student, teacher)
    if not leaves:
        raise InputError(f"the model's output ({_describe(student)}) holds no tensor to distill; pass a loss callable")
    return sum(F.mse_loss(s.float(), t.detach().float()) for _, s, t in leaves)
