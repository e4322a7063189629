"""Dense task heads on BEV features: map segmentation (conv decoder) and occupancy (FlashOcc style).

``SegHead``: BEV features [B, C, s, s] -> class logits [B, K, S, S] (upsampled to the map grid
when the BEV grid is coarser, as BEVFormer's 32 x 32). ``OccHead``: BEV features [B, C, S, S] ->
voxel logits [B, K, Z, S, S] by FlashOcc's channel-to-height lifting: a conv gives ``Z * c``
channels per cell, read as ``Z`` voxels of ``c`` features, then one small MLP shared by every voxel
classifies them. ``dense_loss`` is cross-entropy + soft dice over the evaluated elements.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from examples.bev.dense_targets import IGNORE
from examples.bev.trunk import conv_bn_relu

DICE_WEIGHT = 1.0


class SegHead(nn.Module):
    """Conv decoder: 3x3 conv, ``upsample`` x bilinear + 3x3 conv (if > 1), 3x3 conv, 1x1 classifier."""

    def __init__(self, cin: int, classes: int, mid: int = 64, upsample: int = 1) -> None:
        super().__init__()
        self.upsample = upsample
        self.reduce = conv_bn_relu(cin, mid)
        self.refine = conv_bn_relu(mid, mid) if upsample > 1 else nn.Identity()
        self.decode = conv_bn_relu(mid, mid)
        self.classifier = nn.Conv2d(mid, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x)
        if self.upsample > 1:
            x = self.refine(F.interpolate(x, scale_factor=float(self.upsample), mode="bilinear", align_corners=False))
        return self.classifier(self.decode(x))


class OccHead(nn.Module):
    """Channel-to-height occupancy head: BEV [B, C, S, S] -> logits [B, classes, layers, S, S]."""

    def __init__(self, cin: int, classes: int, layers: int, mid: int = 64, voxel_channels: int = 16) -> None:
        super().__init__()
        self.layers, self.voxel_channels = layers, voxel_channels
        self.bev = nn.Sequential(conv_bn_relu(cin, mid), conv_bn_relu(mid, mid))
        self.to_height = nn.Conv2d(mid, layers * voxel_channels, 1)
        self.classifier = nn.Sequential(nn.Linear(voxel_channels, 2 * voxel_channels), nn.Softplus(), nn.Linear(2 * voxel_channels, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.to_height(self.bev(x))                                      # [B, Z*c, S, S]
        voxels = x.unflatten(1, (self.layers, self.voxel_channels))          # [B, Z, c, S, S]
        logits = self.classifier(voxels.permute(0, 1, 3, 4, 2))              # [B, Z, S, S, K]
        return logits.permute(0, 4, 1, 2, 3)


def dense_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy + ``DICE_WEIGHT`` x soft dice (mean over classes present in the batch).

    ``logits`` [B, K, ...], ``labels`` [B, ...] (``IGNORE`` is skipped), ``mask`` [B, ...] bool
    (False is skipped: Occ3D-style training on camera-visible voxels only)."""
    labels = labels.long()
    valid = labels != IGNORE
    if mask is not None:
        valid = valid & mask.bool()
    target = torch.where(valid, labels, torch.full_like(labels, -100))
    ce = F.cross_entropy(logits.float(), target, ignore_index=-100)
    probs = logits.float().softmax(1) * valid.unsqueeze(1)
    one_hot = F.one_hot(torch.where(valid, labels, torch.zeros_like(labels)), logits.shape[1]).movedim(-1, 1) * valid.unsqueeze(1)
    dims = [0] + list(range(2, logits.dim()))
    inter, total = (probs * one_hot).sum(dims), probs.sum(dims) + one_hot.sum(dims)
    present = one_hot.sum(dims) > 0
    dice = 1 - (2 * inter + 1.0) / (total + 1.0)
    return ce + DICE_WEIGHT * (dice * present).sum() / present.sum().clamp(min=1)
