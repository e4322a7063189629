"""TinyBEVFormer: BEV queries with temporal self-attention (TSA) and spatial cross-attention (SCA),
then a deformable DETR decoder with iterative box refinement.

Traceable formulations: SCA gives every camera all queries and masks by visibility (static shape,
as BEVFormer_tensorrt) instead of ``nonzero`` rebatching; the previous BEV is computed from the
previous frame's images in the same forward, ``.detach()``-ed (BEVFormer uses ``no_grad``) and
resampled into the current frame (BEVFormer's rotate + shift); box refinement is out of place.
"""
from __future__ import annotations

import torch
from torch import nn

from examples.bev import rig
from examples.bev.deform import DeformableAttention
from examples.bev.lss import bev_cell_centres, warp_bev
from examples.bev.query_head import inverse_sigmoid, query_decode, query_loss
from examples.bev.scenes import example_batch
from examples.bev.trunk import ImageTrunk

DIM, HEADS, BEV = 64, 4, 32
NUM_QUERIES = 100
PILLAR_Z = (0.0, 0.6, 1.2, 1.8)
IMAGE_SHAPES = ((rig.IMG_H // 8, rig.IMG_W // 8), (rig.IMG_H // 16, rig.IMG_W // 16))


def ffn(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))


class SpatialCrossAttention(nn.Module):
    """BEV queries [B, Q, C] attend to the image features of the cameras their pillars project into."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = DeformableAttention(DIM, HEADS, IMAGE_SHAPES, points=8, anchors=len(PILLAR_Z), project_output=False)
        self.output_proj = nn.Linear(DIM, DIM)
        pillars = bev_cell_centres(BEV)[:, None, :].repeat(1, len(PILLAR_Z), 1)
        pillars[..., 2] = torch.tensor(PILLAR_Z)
        self.register_buffer("pillars", pillars.flatten(0, 1), persistent=False)     # [Q*A, 4]

    def forward(self, query: torch.Tensor, lidar2img: torch.Tensor, maps: list[torch.Tensor]) -> torch.Tensor:
        cam = self.pillars @ lidar2img.transpose(-1, -2)                               # [B, 6, Q*A, 4]
        depth = cam[..., 2:3]
        uv = cam[..., :2] / depth.clamp(min=1e-5) / torch.tensor([rig.IMG_W, rig.IMG_H], device=cam.device, dtype=cam.dtype)
        hit = (depth[..., 0] > 1e-5) & (uv > 0).all(-1) & (uv < 1).all(-1)
        hit = hit.unflatten(-1, (-1, len(PILLAR_Z))).any(-1).float()                   # [B, 6, Q]
        reference = uv.unflatten(2, (-1, len(PILLAR_Z))).flatten(0, 1)                # [B*6, Q, A, 2]
        per_cam = query.unsqueeze(1).expand(-1, rig.NUM_CAMS, -1, -1).flatten(0, 1)
        out = self.attn(per_cam, reference, maps).unflatten(0, (-1, rig.NUM_CAMS))
        out = (out * hit.unsqueeze(-1)).sum(1) / hit.sum(1).clamp(min=1.0).unsqueeze(-1)
        return self.output_proj(out)


class EncoderLayer(nn.Module):
    """TSA -> norm -> SCA -> norm -> FFN -> norm, each with a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.tsa = DeformableAttention(DIM, HEADS, ((BEV, BEV), (BEV, BEV)), points=4, query_dim=2 * DIM)
        self.sca = SpatialCrossAttention()
        self.ffn = ffn(DIM)
        self.norms = nn.ModuleList(nn.LayerNorm(DIM) for _ in range(3))

    def forward(self, query: torch.Tensor, pos: torch.Tensor, prev: torch.Tensor, reference: torch.Tensor,
                lidar2img: torch.Tensor, maps: list[torch.Tensor]) -> torch.Tensor:
        # TSA: the two queues (previous BEV, current queries) are the two "levels" of one deformable attention.
        q = query + pos
        as_map = [prev.transpose(1, 2).unflatten(2, (BEV, BEV)), query.transpose(1, 2).unflatten(2, (BEV, BEV))]
        query = self.norms[0](query + self.tsa(torch.cat([prev, q], -1), reference, as_map))
        query = self.norms[1](query + self.sca(query + pos, lidar2img, maps))
        return self.norms[2](query + self.ffn(query))


class DecoderLayer(nn.Module):
    """Self-attention (MHA) -> norm -> deformable cross-attention on the BEV map -> norm -> FFN -> norm."""

    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.cross_attn = DeformableAttention(DIM, HEADS, ((BEV, BEV),), points=4)
        self.ffn = ffn(DIM)
        self.norms = nn.ModuleList(nn.LayerNorm(DIM) for _ in range(3))
        self.cls_branch = nn.Sequential(nn.Linear(DIM, DIM), nn.LayerNorm(DIM), nn.ReLU(), nn.Linear(DIM, rig.NUM_CLASSES))
        self.reg_branch = nn.Sequential(nn.Linear(DIM, DIM), nn.ReLU(), nn.Linear(DIM, 10))
        nn.init.constant_(self.cls_branch[-1].bias, -4.6)

    def forward(self, query: torch.Tensor, pos: torch.Tensor, reference: torch.Tensor, bev_map: torch.Tensor) -> torch.Tensor:
        q = query + pos
        query = self.norms[0](query + self.self_attn(q, q, query, need_weights=False)[0])
        query = self.norms[1](query + self.cross_attn(query + pos, reference.unsqueeze(2), [bev_map]))
        return self.norms[2](query + self.ffn(query))


class TinyBEVFormer(nn.Module):
    """forward(imgs [B, 2, 6, 3, H, W] (current, previous), lidar2img [B, 6, 4, 4], can_bus [B, 18],
    prev2cur [B, 4, 4]) -> {all_cls [2, B, 100, 3], all_bbox [2, B, 100, 10], bev_embed [B, 1024, 64]}."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = ImageTrunk(out_strides=(8, 16))
        self.bev_queries = nn.Embedding(BEV * BEV, DIM)
        self.row_embed, self.col_embed = nn.Embedding(BEV, DIM // 2), nn.Embedding(BEV, DIM // 2)
        self.can_bus_mlp = nn.Sequential(nn.Linear(18, DIM), nn.ReLU(), nn.Linear(DIM, DIM), nn.ReLU(), nn.LayerNorm(DIM))
        self.cams_embeds = nn.Parameter(torch.randn(rig.NUM_CAMS, DIM) * 0.02)
        self.level_embeds = nn.Parameter(torch.randn(len(IMAGE_SHAPES), DIM) * 0.02)
        self.encoder = nn.ModuleList(EncoderLayer() for _ in range(2))
        self.query_embedding = nn.Embedding(NUM_QUERIES, 2 * DIM)
        self.reference_points = nn.Linear(DIM, 2)
        self.decoder = nn.ModuleList(DecoderLayer() for _ in range(2))
        centres = bev_cell_centres(BEV)
        self.register_buffer("cell_centres", centres, persistent=False)
        self.register_buffer("bev_reference", ((centres[:, :2] + rig.RANGE) / (2 * rig.RANGE))[None, :, None, :], persistent=False)

    def bev_pos(self) -> torch.Tensor:
        x = self.col_embed.weight[None, :, :].expand(BEV, -1, -1)
        y = self.row_embed.weight[:, None, :].expand(-1, BEV, -1)
        return torch.cat([x, y], -1).flatten(0, 1)                                     # [S*S, C], rows = y

    def encode(self, maps: list[torch.Tensor], lidar2img: torch.Tensor, can_bus: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        query = self.bev_queries.weight + self.can_bus_mlp(can_bus).unsqueeze(1)       # [B, S*S, C]
        pos = self.bev_pos()
        prev = query if prev is None else prev                                         # no history: the query twice
        for layer in self.encoder:
            query = layer(query, pos, prev, self.bev_reference, lidar2img, maps)
        return query

    def bev_features(self, imgs: torch.Tensor, lidar2img: torch.Tensor, can_bus: torch.Tensor, prev2cur: torch.Tensor) -> torch.Tensor:
        """The current frame's BEV queries after the encoder, [B, BEV*BEV, DIM] (rows = y)."""
        feats = self.trunk(imgs.flatten(0, 2))
        maps = [(f.unflatten(0, (-1, 2, rig.NUM_CAMS)) + self.cams_embeds[:, :, None, None] + self.level_embeds[i, :, None, None]) for i, f in enumerate(feats)]
        prev_bev = self.encode([m[:, 1].flatten(0, 1) for m in maps], lidar2img, can_bus, None).detach()
        prev_map = warp_bev(prev_bev.transpose(1, 2).unflatten(2, (BEV, BEV)), prev2cur, self.cell_centres)
        return self.encode([m[:, 0].flatten(0, 1) for m in maps], lidar2img, can_bus, prev_map.flatten(2).transpose(1, 2))

    def forward(self, imgs: torch.Tensor, lidar2img: torch.Tensor, can_bus: torch.Tensor, prev2cur: torch.Tensor) -> dict[str, torch.Tensor]:
        bev = self.bev_features(imgs, lidar2img, can_bus, prev2cur)
        bev_map = bev.transpose(1, 2).unflatten(2, (BEV, BEV))
        pos, query = self.query_embedding.weight.split(DIM, -1)
        batch_zeros = torch.zeros_like(can_bus[:, :1, None])                            # [B, 1, 1]: broadcast to the batch
        pos, query = pos + batch_zeros, query + batch_zeros
        reference = self.reference_points(pos).sigmoid()
        all_cls, all_bbox = [], []
        for layer in self.decoder:
            query = layer(query, pos, reference, bev_map)
            delta = layer.reg_branch(query)
            xy = (delta[..., :2] + inverse_sigmoid(reference)).sigmoid()
            all_cls.append(layer.cls_branch(query))
            all_bbox.append(torch.cat([xy, delta[..., 2:]], -1))
            reference = xy.detach()
        return {"all_cls": torch.stack(all_cls), "all_bbox": torch.stack(all_bbox), "bev_embed": bev}

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return query_loss(outputs["all_cls"], outputs["all_bbox"], batch["boxes"], batch["labels"])

    def decode(self, outputs: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return query_decode(outputs["all_cls"], outputs["all_bbox"])


def inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Model inputs from a collated scene batch (both frames)."""
    return batch["imgs"], batch["lidar2img"], batch["can_bus"], batch["prev2cur"]


def build_bevformer() -> TinyBEVFormer:
    return TinyBEVFormer()


def example_inputs(batch: int = 1) -> tuple[torch.Tensor, ...]:
    return inputs(example_batch(batch))
