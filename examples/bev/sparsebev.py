"""TinySparseBEV: sparse box queries refined by one shared decoder layer with scale-adaptive
self-attention, adaptive spatio-temporal sampling (argmax view, 5-D ``grid_sample``) and
AdaptiveMixing (per-query generated channel and point mixing matrices).

Traceable formulations: the query box is ``.detach()``-ed between iterations and refined out of
place; batch-sized constants come from broadcasting with ``zeros_like`` of an input; sampled
points, groups and scale weights keep one (B, T, G) ordering throughout.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from examples.bev import rig
from examples.bev.query_head import inverse_sigmoid, query_decode, query_loss
from examples.bev.scenes import example_batch
from examples.bev.trunk import ImageTrunk

DIM, HEADS, GROUPS, POINTS, FRAMES = 64, 4, 4, 4, 2
LEVELS = 3
NUM_QUERIES, ITERATIONS = 100, 2
MIX_OUT = 8                                   # mixed points per group
Z_MIN, Z_MAX = rig.Z_RANGE


class AdaptiveMixing(nn.Module):
    """AdaMixer: per query and group, mix channels then points with matrices generated from the query."""

    def __init__(self) -> None:
        super().__init__()
        self.channels, self.points = DIM // GROUPS, FRAMES * POINTS
        self.parameter_generator = nn.Linear(DIM, GROUPS * (self.channels**2 + self.points * MIX_OUT))
        self.norm_channels = nn.LayerNorm(self.channels)
        self.norm_points = nn.LayerNorm([self.channels, MIX_OUT])
        self.out_proj = nn.Linear(GROUPS * self.channels * MIX_OUT, DIM)

    def forward(self, sampled: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """sampled [B, Q, G, T*P, c], query [B, Q, C] -> [B, Q, C]."""
        params = self.parameter_generator(query).unflatten(-1, (GROUPS, -1))
        channel_mix = params[..., : self.channels**2].unflatten(-1, (self.channels, self.channels))
        point_mix = params[..., self.channels**2 :].unflatten(-1, (self.points, MIX_OUT))
        x = F.relu(self.norm_channels(sampled @ channel_mix))                        # activation x activation
        x = F.relu(self.norm_points(x.transpose(-1, -2) @ point_mix))                # [B, Q, G, c, MIX_OUT]
        return self.out_proj(x.flatten(2))


class SparseBEVLayer(nn.Module):
    """One decoder layer, applied ITERATIONS times with shared weights."""

    def __init__(self) -> None:
        super().__init__()
        self.position_encoder = nn.Sequential(nn.Linear(3, DIM), nn.ReLU(), nn.Linear(DIM, DIM))
        self.self_attn = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.gen_tau = nn.Linear(DIM, HEADS)
        self.sampling_offset = nn.Linear(DIM, GROUPS * POINTS * 3)
        self.scale_weights = nn.Linear(DIM, GROUPS * POINTS * LEVELS)
        self.mixing = AdaptiveMixing()
        self.ffn = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.ReLU(), nn.Linear(2 * DIM, DIM))
        self.norms = nn.ModuleList(nn.LayerNorm(DIM) for _ in range(3))
        self.cls_branch = nn.Sequential(nn.Linear(DIM, DIM), nn.LayerNorm(DIM), nn.ReLU(), nn.Linear(DIM, rig.NUM_CLASSES))
        self.reg_branch = nn.Sequential(nn.Linear(DIM, DIM), nn.ReLU(), nn.Linear(DIM, 10))
        nn.init.zeros_(self.gen_tau.weight)
        nn.init.uniform_(self.gen_tau.bias, 0.0, 2.0)
        nn.init.constant_(self.cls_branch[-1].bias, -4.6)

    def centres(self, bbox: torch.Tensor) -> torch.Tensor:
        """Query box [B, Q, 10] -> centre in metres [B, Q, 3]."""
        return torch.cat([bbox[..., :2] * (2 * rig.RANGE) - rig.RANGE, bbox[..., 2:3]], -1)

    def sample_points(self, query: torch.Tensor, bbox: torch.Tensor, time_diff: torch.Tensor) -> torch.Tensor:
        """Points [B, T, Q, G, P, 3] (ego metres): offsets scaled by box size, rotated by yaw, warped back by velocity x dt."""
        offsets = self.sampling_offset(query).unflatten(-1, (GROUPS, POINTS, 3))
        size = bbox[..., 3:6].clamp(max=math.log(20.0)).exp()                          # w, l, h
        local = offsets * torch.stack([size[..., 1], size[..., 0], size[..., 2]], -1)[:, :, None, None, :]
        sin, cos = bbox[..., 6, None, None], bbox[..., 7, None, None]
        x = cos * local[..., 0] - sin * local[..., 1]
        y = sin * local[..., 0] + cos * local[..., 1]
        points = torch.stack([x, y, local[..., 2]], -1) + self.centres(bbox)[:, :, None, None, :]
        shift = bbox[..., 8:10, None] * time_diff[:, None, None, :]                      # [B, Q, 2, T]
        shift = torch.cat([shift, torch.zeros_like(shift[:, :, :1])], 2)
        return points.unsqueeze(1) - shift.permute(0, 3, 1, 2)[:, :, :, None, None, :]

    def sample(self, points: torch.Tensor, lidar2img: torch.Tensor, maps: list[torch.Tensor], query: torch.Tensor) -> torch.Tensor:
        """Project points into every view of their frame, keep one view (argmax of validity), sample all levels."""
        hom = torch.cat([points, torch.ones_like(points[..., :1])], -1).flatten(2, 4)        # [B, T, QGP, 4]
        cam = hom.unsqueeze(2) @ lidar2img.unflatten(1, (FRAMES, rig.NUM_CAMS)).transpose(-1, -2)  # [B, T, 6, QGP, 4]
        depth = cam[..., 2:3]
        uv = cam[..., :2] / depth.clamp(min=1e-5) / torch.tensor([rig.IMG_W, rig.IMG_H], device=cam.device, dtype=cam.dtype)
        valid = (depth[..., 0] > 1e-5) & (uv > 0).all(-1) & (uv < 1).all(-1)
        view = valid.float().argmax(2, keepdim=True)                                     # [B, T, 1, QGP]
        uv = uv.gather(2, view.unsqueeze(-1).expand(-1, -1, -1, -1, 2)).squeeze(2)       # [B, T, QGP, 2]
        cam_coord = (2 * view.squeeze(2).float() + 1) / rig.NUM_CAMS - 1
        grid = torch.cat([2 * uv - 1, cam_coord.unsqueeze(-1)], -1)
        grid = grid.unflatten(2, (-1, GROUPS, POINTS)).permute(0, 1, 3, 2, 4, 5)         # [B, T, G, Q, P, 3]
        grid = grid.flatten(0, 2).unsqueeze(1)                                           # [B*T*G, 1, Q, P, 3]
        weights = self.scale_weights(query).unflatten(-1, (GROUPS, POINTS, LEVELS)).softmax(-1)
        out = 0
        for level, fmap in enumerate(maps):
            value = fmap.unflatten(0, (-1, FRAMES, rig.NUM_CAMS)).unflatten(3, (GROUPS, -1))   # [B, T, 6, G, c, H, W]
            value = value.permute(0, 1, 3, 4, 2, 5, 6).flatten(0, 2)                         # [B*T*G, c, 6, H, W]
            sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            sampled = sampled.squeeze(2).unflatten(0, (-1, FRAMES, GROUPS))                  # [B, T, G, c, Q, P]
            sampled = sampled.permute(0, 4, 2, 1, 5, 3)                                      # [B, Q, G, T, P, c]
            out = out + sampled * weights[..., level][:, :, :, None, :, None]
        return out.flatten(3, 4)                                                         # [B, Q, G, T*P, c]

    def forward(self, query: torch.Tensor, bbox: torch.Tensor, time_diff: torch.Tensor, lidar2img: torch.Tensor,
                maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        centre = self.centres(bbox)
        norm_centre = torch.cat([bbox[..., :2], (bbox[..., 2:3] - Z_MIN) / (Z_MAX - Z_MIN)], -1)
        query = query + self.position_encoder(norm_centre)
        # Scale-adaptive self-attention: additive mask = -BEV distance x per-head tau.
        dist = torch.cdist(centre[..., :2], centre[..., :2])
        tau = self.gen_tau(query).transpose(1, 2)                                         # [B, heads, Q]
        mask = (-tau.unsqueeze(-1) * dist.unsqueeze(1)).flatten(0, 1)
        query = self.norms[0](query + self.self_attn(query, query, query, attn_mask=mask, need_weights=False)[0])
        points = self.sample_points(query, bbox, time_diff)
        query = self.norms[1](query + self.mixing(self.sample(points, lidar2img, maps, query), query))
        query = self.norms[2](query + self.ffn(query))
        delta = self.reg_branch(query)
        xy = (delta[..., :2] + inverse_sigmoid(bbox[..., :2])).sigmoid()
        new_bbox = torch.cat([xy, bbox[..., 2:3] + delta[..., 2:3], delta[..., 3:]], -1)
        return query, self.cls_branch(query), new_bbox


class TinySparseBEV(nn.Module):
    """forward(imgs [B, T*6, 3, H, W] (current views first), lidar2img [B, T*6, 4, 4] (current ego -> each
    view), time_diff [B, T]) -> {all_cls [2, B, 100, 3], all_bbox [2, B, 100, 10]}."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = ImageTrunk(out_strides=(8, 16, 32))
        self.layer = SparseBEVLayer()
        self.query_feat = nn.Embedding(NUM_QUERIES, DIM)
        self.init_query_bbox = nn.Embedding(NUM_QUERIES, 10)
        side = int(math.sqrt(NUM_QUERIES))
        grid = (torch.arange(side) + 0.5) / side
        init = torch.zeros(NUM_QUERIES, 10)
        init[:, 0], init[:, 1] = grid.repeat(side), grid.repeat_interleave(side)
        init[:, 2], init[:, 7] = 0.8, 1.0
        self.init_query_bbox.weight.data.copy_(init)

    def forward(self, imgs: torch.Tensor, lidar2img: torch.Tensor, time_diff: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = self.trunk(imgs.flatten(0, 1))
        batch_zeros = torch.zeros_like(time_diff[:, :1, None])                            # [B, 1, 1]
        query = self.query_feat.weight + batch_zeros
        bbox = self.init_query_bbox.weight + batch_zeros
        all_cls, all_bbox = [], []
        for _ in range(ITERATIONS):
            query, cls, new_bbox = self.layer(query, bbox, time_diff, lidar2img, maps)
            all_cls.append(cls)
            all_bbox.append(new_bbox)
            bbox = new_bbox.detach()
        return {"all_cls": torch.stack(all_cls), "all_bbox": torch.stack(all_bbox)}

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return query_loss(outputs["all_cls"], outputs["all_bbox"], batch["boxes"], batch["labels"])

    def decode(self, outputs: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return query_decode(outputs["all_cls"], outputs["all_bbox"])


def inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Model inputs from a collated scene batch: both frames' views, each with its own ego -> image matrix."""
    cur2prev = rig.rigid_inverse(batch["prev2cur"])
    lidar2img = torch.cat([batch["lidar2img"], batch["lidar2img"] @ cur2prev[:, None]], 1)
    return batch["imgs"].flatten(1, 2), lidar2img, batch["time_diff"]


def build_sparsebev() -> TinySparseBEV:
    return TinySparseBEV()


def example_inputs(batch: int = 1) -> tuple[torch.Tensor, ...]:
    return inputs(example_batch(batch))
