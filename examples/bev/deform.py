"""Multi-scale deformable attention in plain PyTorch (mmcv's ``multi_scale_deformable_attn_pytorch``).

Traceable by torch.fx because level shapes and anchor counts are Python ints fixed at construction;
sampling locations and weights stay float, and the sampling is one ``grid_sample`` per level.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def deform_sample(values: list[torch.Tensor], locations: torch.Tensor, weights: torch.Tensor, heads: int) -> torch.Tensor:
    """values: per level [B*heads, d, H_l, W_l]; locations [B, Q, heads, L, P, 2] in [0, 1] (x, y);
    weights [B, Q, heads, L, P] -> [B, Q, heads * d]."""
    grids = 2 * locations - 1
    weights = weights.transpose(1, 2).flatten(0, 1).unsqueeze(1)                 # [B*heads, 1, Q, L, P]
    out = 0
    for level, value in enumerate(values):
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)               # [B*heads, Q, P, 2]
        sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = out + (sampled * weights[..., level, :]).sum(-1)                    # [B*heads, d, Q]
    return out.unflatten(0, (-1, heads)).flatten(1, 2).transpose(1, 2)


class DeformableAttention(nn.Module):
    """Deformable attention of queries [B, Q, query_dim] on feature maps [B, C, H_l, W_l].

    ``level_shapes`` are the (H, W) of the maps passed to ``forward``. ``reference`` [B, Q, A, 2]
    in [0, 1]: the ``points`` per level are split evenly over the ``A = anchors`` reference points
    (BEVFormer SCA: 4 pillar heights x 2 points; A = 1 elsewhere).
    """

    def __init__(self, dim: int, heads: int, level_shapes: tuple[tuple[int, int], ...], points: int,
                 anchors: int = 1, query_dim: int | None = None, project_output: bool = True) -> None:
        super().__init__()
        self.heads, self.levels, self.points = heads, len(level_shapes), points
        self.level_shapes = tuple(level_shapes)   # Python ints: FX cannot iterate a shape tensor
        self.register_buffer("normaliser", torch.tensor([[w, h] for h, w in level_shapes], dtype=torch.float32), persistent=False)
        self.anchors = anchors
        levels = self.levels
        query_dim = query_dim or dim
        self.sampling_offsets = nn.Linear(query_dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(query_dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim) if project_output else nn.Identity()
        self._init_offsets()

    def _init_offsets(self) -> None:
        # mmcv's initialisation: zero weights, biases fan out along head directions, growing with point index.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.heads) * (2 * math.pi / self.heads)
        dirs = torch.stack([angles.cos(), angles.sin()], -1)
        dirs = dirs / dirs.abs().max(-1, keepdim=True).values
        bias = dirs[:, None, None, :] * torch.arange(1, self.points + 1)[None, None, :, None]
        self.sampling_offsets.bias.data.copy_(bias.expand(self.heads, self.levels, self.points, 2).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)

    def forward(self, query: torch.Tensor, reference: torch.Tensor, maps: list[torch.Tensor]) -> torch.Tensor:
        offsets = self.sampling_offsets(query).unflatten(-1, (self.heads, self.levels, self.anchors, self.points // self.anchors, 2))
        values = []
        for fmap, shape in zip(maps, self.level_shapes):
            tokens = self.value_proj(fmap.flatten(2).transpose(1, 2))              # [B, HW, C]
            value = tokens.transpose(1, 2).unflatten(2, shape)
            values.append(value.unflatten(1, (self.heads, -1)).flatten(0, 1))
        loc = reference[:, :, None, None, :, None, :] + offsets / self.normaliser[:, None, None, :]
        weights = self.attention_weights(query).unflatten(-1, (self.heads, -1)).softmax(-1)
        out = deform_sample(values, loc.flatten(4, 5), weights.unflatten(-1, (self.levels, self.points)), self.heads)
        return self.output_proj(out)
