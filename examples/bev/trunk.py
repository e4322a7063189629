"""Shared image trunk: a small ResNet-style backbone (16-32-64-128-256, strides 8/16/32 out) and an FPN."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, pad, dilation=dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(cin, cout, 3, stride)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(self.conv1(x))) + self.shortcut(x))


class ImageTrunk(nn.Module):
    """Images [B*N, 3, H, W] -> FPN features (64 ch) at ``out_strides`` (of 8, 16, 32), finest first.

    Laterals exist from the finest requested stride up to 32 (the top-down path needs them);
    output convs only for requested strides, so no parameter goes unused (BEVDet's ``out_ids``).
    """

    def __init__(self, out_strides: tuple[int, ...] = (8, 16, 32), channels: int = 64) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, 16, 3, 2)
        widths = (16, 32, 64, 128, 256)
        self.stages = nn.ModuleList(BasicBlock(cin, cout, 2) for cin, cout in zip(widths[:-1], widths[1:]))
        strides = (8, 16, 32)
        self.first = strides.index(min(out_strides))
        self.keep = [strides.index(s) - self.first for s in sorted(out_strides)]
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in widths[2 + self.first :])
        self.output = nn.ModuleList(conv_bn_relu(channels, channels) for _ in self.keep)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        laterals = [conv(f) for conv, f in zip(self.lateral, feats[1 + self.first :])]
        outs = [laterals[-1]]
        for lat in reversed(laterals[:-1]):
            outs.insert(0, lat + F.interpolate(outs[0], scale_factor=2.0, mode="nearest"))
        return [conv(outs[i]) for conv, i in zip(self.output, self.keep)]
