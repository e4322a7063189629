"""TinyBEVDepth4D: BEVDet with a camera-aware DepthNet (depth supervision) and two frames.

Both frames share the trunk, DepthNet and lift-splat; the previous frame's BEV map is
``.detach()``-ed (BEVDet4D computes it under ``no_grad``, which FX would trace silently wrong)
and resampled into the current ego frame before the concatenation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from examples.bev import rig
from examples.bev.center_head import CenterHead, center_decode, center_loss
from examples.bev.lss import BEVEncoder, LiftSplat, bev_cell_centres, warp_bev
from examples.bev.scenes import example_batch
from examples.bev.trunk import BasicBlock, conv_bn_relu, ImageTrunk

DEPTH_BINS = (2.0, 58.0, 48)
CONTEXT = 32
CAM_PARAMS = 16       # fx, fy, cx, cy + the 3 x 4 of cam2ego
FEATURE_STRIDE = 16
DEPTH_LOSS_WEIGHT = 3.0


class SqueezeExcite(nn.Module):
    """Gate feature maps with a vector computed from the camera parameters (BEVDepth's SELayer)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(channels, channels, 1), nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return x * self.expand(F.relu(self.reduce(context[:, :, None, None]))).sigmoid()


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, dilated 3x3 (2, 4) and an image-pool branch, fused by 1x1."""

    def __init__(self, channels: int, mid: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(channels, mid, 1), conv_bn_relu(channels, mid, 3, dilation=2), conv_bn_relu(channels, mid, 3, dilation=4)])
        self.pool = conv_bn_relu(channels, mid, 1)
        self.fuse = conv_bn_relu(4 * mid, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        outs.append(self.pool(F.adaptive_avg_pool2d(x, 1)).expand_as(outs[0]))
        return self.fuse(torch.cat(outs, 1))


class DepthNet(nn.Module):
    """Camera-aware depth and context: BN1d over camera numbers, MLP + SE gates, BasicBlocks, ASPP."""

    def __init__(self, cin: int = 64, mid: int = 64) -> None:
        super().__init__()
        self.reduce = conv_bn_relu(cin, mid)
        self.cam_bn = nn.BatchNorm1d(CAM_PARAMS)
        self.depth_mlp = nn.Sequential(nn.Linear(CAM_PARAMS, mid), nn.ReLU(), nn.Linear(mid, mid))
        self.context_mlp = nn.Sequential(nn.Linear(CAM_PARAMS, mid), nn.ReLU(), nn.Linear(mid, mid))
        self.depth_se, self.context_se = SqueezeExcite(mid), SqueezeExcite(mid)
        self.context_conv = nn.Conv2d(mid, CONTEXT, 1)
        self.depth_conv = nn.Sequential(BasicBlock(mid, mid), BasicBlock(mid, mid), ASPP(mid, 32), nn.Conv2d(mid, DEPTH_BINS[2], 1))

    def forward(self, x: torch.Tensor, cam_params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.cam_bn(cam_params)
        x = self.reduce(x)
        context = self.context_conv(self.context_se(x, self.context_mlp(params)))
        depth = self.depth_conv(self.depth_se(x, self.depth_mlp(params)))
        return depth, context


class TinyBEVDepth4D(nn.Module):
    """forward(imgs [B, 2, 6, 3, H, W] (current, previous), cam2ego [B, 6, 4, 4], intrins [B, 6, 3, 3],
    prev2cur [B, 4, 4]) -> CenterHead maps + ``depth`` probabilities [B, 6, D, H/16, W/16] (current frame)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = ImageTrunk(out_strides=(16,))
        self.depth_net = DepthNet()
        self.lift = LiftSplat(DEPTH_BINS, stride=FEATURE_STRIDE)
        self.register_buffer("cell_centres", bev_cell_centres(rig.BEV_SIZE), persistent=False)
        self.pre_process = BasicBlock(2 * CONTEXT, 2 * CONTEXT)
        self.bev_encoder = BEVEncoder(2 * CONTEXT)
        self.head = CenterHead()

    def bev_features(self, imgs: torch.Tensor, cam2ego: torch.Tensor, intrins: torch.Tensor, prev2cur: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(BEV encoder output [B, 64, S, S], current-frame depth probabilities [B, 6, D, h, w])."""
        feats = self.trunk(imgs.flatten(0, 2))[0]
        cam_params = torch.cat([intrins[..., :2, 2], intrins[..., 0, :1], intrins[..., 1, 1:2], cam2ego[..., :3, :].flatten(-2)], -1)
        cam_params = cam_params.unsqueeze(1).expand(-1, 2, -1, -1)             # same rig in both frames
        depth, context = self.depth_net(feats, cam_params.flatten(0, 2))
        depth = depth.softmax(1).unflatten(0, (-1, rig.NUM_CAMS))               # [B*2, 6, D, h, w]
        context = context.unflatten(0, (-1, rig.NUM_CAMS))
        frames = (cam2ego.unsqueeze(1).expand(-1, 2, -1, -1, -1).flatten(0, 1), intrins.unsqueeze(1).expand(-1, 2, -1, -1, -1).flatten(0, 1))
        bev = self.lift(depth, context, *frames).unflatten(0, (-1, 2))
        previous = warp_bev(bev[:, 1].detach(), prev2cur, self.cell_centres)
        x = self.pre_process(torch.cat([bev[:, 0], previous], 1))
        return self.bev_encoder(x), depth.unflatten(0, (-1, 2))[:, 0]

    def forward(self, imgs: torch.Tensor, cam2ego: torch.Tensor, intrins: torch.Tensor, prev2cur: torch.Tensor) -> dict[str, torch.Tensor]:
        bev, depth = self.bev_features(imgs, cam2ego, intrins, prev2cur)
        outputs = self.head(bev)
        outputs["depth"] = depth
        return outputs

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        losses = center_loss(outputs, batch["boxes"], batch["labels"], batch["heatmap"])
        losses["depth"] = DEPTH_LOSS_WEIGHT * depth_loss(outputs["depth"], batch["depth"])
        return losses

    def decode(self, outputs: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return center_decode(outputs)


def depth_loss(depth: torch.Tensor, depth_map: torch.Tensor) -> torch.Tensor:
    """BCE between predicted depth distributions and one-hot bins of the rendered depth at feature-pixel centres."""
    d_min, d_max, count = DEPTH_BINS
    half = FEATURE_STRIDE // 2
    gt = depth_map[..., half::FEATURE_STRIDE, half::FEATURE_STRIDE]                 # [B, 6, h, w]
    step = (d_max - d_min) / (count - 1)
    bins = ((gt - d_min) / step).round()
    valid = (gt > 0) & (bins >= 0) & (bins < count)
    target = F.one_hot(bins.clamp(0, count - 1).long(), count).permute(0, 1, 4, 2, 3).float()
    pred = depth.clamp(1e-4, 1 - 1e-4)
    bce = F.binary_cross_entropy(pred, target, reduction="none").sum(2)
    return (bce * valid).sum() / valid.sum().clamp(min=1)


def inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Model inputs from a collated scene batch (both frames)."""
    return batch["imgs"], batch["cam2ego"], batch["intrins"], batch["prev2cur"]


def build_bevdepth4d() -> TinyBEVDepth4D:
    return TinyBEVDepth4D()


def example_inputs(batch: int = 1) -> tuple[torch.Tensor, ...]:
    return inputs(example_batch(batch))
