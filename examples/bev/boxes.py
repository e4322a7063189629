"""The box code both head families regress, and the split of decoded detections per sample.

Boxes are [..., 9]: x, y, z, w, l, h, yaw, vx, vy (ego frame, metres, radians, m/s).
The code is [..., 10]: x, y, z, log w, log l, log h, sin yaw, cos yaw, vx, vy.
"""
from __future__ import annotations

import math

import torch

CODE_WEIGHTS = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2)


def encode(boxes: torch.Tensor) -> torch.Tensor:
    yaw = boxes[..., 6:7]
    return torch.cat([boxes[..., :3], boxes[..., 3:6].clamp(min=1e-3).log(), yaw.sin(), yaw.cos(), boxes[..., 7:9]], -1)


def decode(code: torch.Tensor) -> torch.Tensor:
    yaw = torch.atan2(code[..., 6], code[..., 7]).unsqueeze(-1)
    return torch.cat([code[..., :3], code[..., 3:6].clamp(max=math.log(20.0)).exp(), yaw, code[..., 8:10]], -1)


def per_sample(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, min_score: float) -> list[dict[str, torch.Tensor]]:
    """Batched top-k detections -> one dict (boxes, scores, labels on CPU) per sample, low scores dropped."""
    keep = scores >= min_score
    return [{"boxes": boxes[b][keep[b]].cpu(), "scores": scores[b][keep[b]].cpu(), "labels": labels[b][keep[b]].cpu()} for b in range(len(boxes))]
