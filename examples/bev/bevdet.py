"""TinyBEVDet: image trunk -> 1x1 depth net -> lift-splat (static scatter_add) -> BEV ResNet+FPN -> CenterHead."""
from __future__ import annotations

import torch
from torch import nn

from examples.bev import rig
from examples.bev.center_head import CenterHead, center_decode, center_loss
from examples.bev.lss import BEVEncoder, LiftSplat
from examples.bev.scenes import example_batch
from examples.bev.trunk import ImageTrunk

DEPTH_BINS = (2.0, 58.0, 24)
CONTEXT = 32


class TinyBEVDet(nn.Module):
    """forward(imgs [B, 6, 3, H, W], cam2ego [B, 6, 4, 4], intrins [B, 6, 3, 3]) -> CenterHead maps."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = ImageTrunk(out_strides=(16,))
        self.depth_net = nn.Conv2d(64, DEPTH_BINS[2] + CONTEXT, 1)
        self.lift = LiftSplat(DEPTH_BINS, stride=16)
        self.bev_encoder = BEVEncoder(CONTEXT)
        self.head = CenterHead()

    def bev_features(self, imgs: torch.Tensor, cam2ego: torch.Tensor, intrins: torch.Tensor) -> torch.Tensor:
        """The BEV encoder's output [B, 64, S, S], which the head (or a task head) reads."""
        feats = self.trunk(imgs.flatten(0, 1))[0]
        x = self.depth_net(feats).unflatten(0, (-1, rig.NUM_CAMS))
        depth = x[:, :, : DEPTH_BINS[2]].softmax(2)
        bev = self.lift(depth, x[:, :, DEPTH_BINS[2] :], cam2ego, intrins)
        return self.bev_encoder(bev)

    def forward(self, imgs: torch.Tensor, cam2ego: torch.Tensor, intrins: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(self.bev_features(imgs, cam2ego, intrins))

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return center_loss(outputs, batch["boxes"], batch["labels"], batch["heatmap"])

    def decode(self, outputs: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return center_decode(outputs)


def inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Model inputs from a collated scene batch (current frame only)."""
    return batch["imgs"][:, 0], batch["cam2ego"], batch["intrins"]


def build_bevdet() -> TinyBEVDet:
    return TinyBEVDet()


def example_inputs(batch: int = 1) -> tuple[torch.Tensor, ...]:
    return inputs(example_batch(batch))
