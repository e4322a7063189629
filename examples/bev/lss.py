"""Lift-splat-shoot pieces shared by TinyBEVDet and TinyBEVDepth4D, written to trace with torch.fx.

The splat is a static-shape ``scatter_add`` into ``S*S + 1`` cells per sample: points outside the
grid go to the last (dump) cell, which is dropped. That is the same sum as BEVDet's ``bev_pool_v2``
without its data-dependent filtering, sorting and ``len`` checks. ``warp_bev`` aligns a BEV map of
the previous ego frame to the current one (BEVDet4D's ``shift_feature``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from examples.bev import rig
from examples.bev.trunk import BasicBlock, conv_bn_relu


class LiftSplat(nn.Module):
    """depth probs [B, N, D, h, w] x features [B, N, C, h, w] -> BEV [B, C, S, S] (sum per cell)."""

    def __init__(self, depth_bins: tuple[float, float, int], stride: int, bev_size: int = rig.BEV_SIZE) -> None:
        super().__init__()
        d_min, d_max, count = depth_bins
        h, w = rig.IMG_H // stride, rig.IMG_W // stride
        depth = torch.linspace(d_min, d_max, count)
        v, u = torch.meshgrid((torch.arange(h) + 0.5) * stride, (torch.arange(w) + 0.5) * stride, indexing="ij")
        self.register_buffer("frustum", torch.stack(torch.broadcast_tensors(u, v, depth[:, None, None]), -1), persistent=False)
        self.bev_size = bev_size
        self.cell = 2 * rig.RANGE / bev_size

    def geometry(self, cam2ego: torch.Tensor, intrins: torch.Tensor) -> torch.Tensor:
        """Ego coordinates [B, N, D, h, w, 3] of every frustum point (pinhole unprojection, then extrinsics)."""
        fx, fy = intrins[..., 0, 0, None, None, None], intrins[..., 1, 1, None, None, None]
        cx, cy = intrins[..., 0, 2, None, None, None], intrins[..., 1, 2, None, None, None]
        u, v, d = self.frustum[..., 0], self.frustum[..., 1], self.frustum[..., 2]
        cam = torch.stack([(u - cx) / fx * d, (v - cy) / fy * d, d.expand_as(fx * u)], -1)
        rot, trans = cam2ego[:, :, None, None, None, :3, :3], cam2ego[:, :, None, None, None, :3, 3]
        return (rot @ cam[..., None]).squeeze(-1) + trans

    def forward(self, depth: torch.Tensor, feat: torch.Tensor, cam2ego: torch.Tensor, intrins: torch.Tensor) -> torch.Tensor:
        points = self.geometry(cam2ego, intrins)
        cells = ((points[..., :2] + rig.RANGE) / self.cell).floor()
        inside = (cells >= 0).all(-1) & (cells < self.bev_size).all(-1)
        inside = inside & (points[..., 2] >= rig.Z_RANGE[0]) & (points[..., 2] < rig.Z_RANGE[1])
        index = cells[..., 1] * self.bev_size + cells[..., 0]
        index = torch.where(inside, index, torch.full_like(index, self.bev_size * self.bev_size)).long()
        volume = depth.unsqueeze(-1) * feat.permute(0, 1, 3, 4, 2).unsqueeze(2)   # [B, N, D, h, w, C]
        volume = volume.flatten(1, 4)
        index = index.flatten(1).unsqueeze(-1).expand_as(volume)
        bev = volume.new_zeros(volume.shape[0], self.bev_size * self.bev_size + 1, volume.shape[2])
        bev = bev.scatter_add(1, index, volume)[:, :-1]
        return bev.transpose(1, 2).unflatten(2, (self.bev_size, self.bev_size))


def warp_bev(bev: torch.Tensor, prev2cur: torch.Tensor, cell_centres: torch.Tensor) -> torch.Tensor:
    """Resample a previous-frame BEV map [B, C, S, S] onto the current frame's grid.

    ``cell_centres`` [S*S, 4] are the homogeneous ego coordinates of the current grid's cells.
    """
    cur2prev = rig.rigid_inverse(prev2cur)
    points = cell_centres @ cur2prev.transpose(1, 2)                  # [B, S*S, 4] in the previous frame
    size = bev.shape[-1]
    grid = (points[..., :2] / rig.RANGE).unflatten(1, (size, size))
    return F.grid_sample(bev, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def bev_cell_centres(size: int) -> torch.Tensor:
    """Homogeneous ego coordinates [S*S, 4] of BEV cell centres, row-major over (y, x)."""
    centres = (torch.arange(size) + 0.5) * (2 * rig.RANGE / size) - rig.RANGE
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([x, y, torch.zeros_like(x), torch.ones_like(x)], -1).reshape(-1, 4)


class BEVEncoder(nn.Module):
    """CustomResNet (2 stages, stride 2 each) + FPN_LSS (concat, convs, upsample back to S x S)."""

    def __init__(self, cin: int, cout: int = 64) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(BasicBlock(cin, 64, 2), BasicBlock(64, 64))
        self.stage2 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128))
        self.fuse = nn.Sequential(conv_bn_relu(64 + 128, 128), conv_bn_relu(128, 128))
        self.up = conv_bn_relu(128, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.stage1(x)
        s2 = self.stage2(s1)
        fused = self.fuse(torch.cat([s1, F.interpolate(s2, scale_factor=2.0, mode="bilinear", align_corners=False)], 1))
        return self.up(F.interpolate(fused, scale_factor=2.0, mode="bilinear", align_corners=False))
