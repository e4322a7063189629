"""CenterPoint-style dense BEV head: maps, Gaussian focal + L1 loss, and top-k decoding to boxes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from examples.bev import boxes as box_code
from examples.bev import rig
from examples.bev.trunk import conv_bn_relu

HEAD_CHANNELS = {"heatmap": rig.NUM_CLASSES, "reg": 2, "height": 1, "dim": 3, "rot": 2, "vel": 2}


class CenterHead(nn.Module):
    """BEV features [B, C, S, S] -> dict of maps (HEAD_CHANNELS), heatmap as logits."""

    def __init__(self, cin: int = 64, mid: int = 64) -> None:
        super().__init__()
        self.shared = conv_bn_relu(cin, mid)
        self.heads = nn.ModuleDict({name: nn.Sequential(conv_bn_relu(mid, mid), nn.Conv2d(mid, out, 1)) for name, out in HEAD_CHANNELS.items()})
        nn.init.constant_(self.heads["heatmap"][-1].bias, -2.19)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.shared(x)
        return {name: head(x) for name, head in self.heads.items()}


def _regression_targets(boxes: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat cell index [B, M] and encoded targets [B, M, 10] of padded boxes [B, M, 9]."""
    cell = 2 * rig.RANGE / size
    grid_xy = (boxes[..., :2] + rig.RANGE) / cell
    cells = grid_xy.floor().clamp(0, size - 1)
    index = (cells[..., 1] * size + cells[..., 0]).long()
    return index, torch.cat([grid_xy - cells, box_code.encode(boxes)[..., 2:]], -1)


def center_loss(outputs: dict[str, torch.Tensor], boxes: torch.Tensor, labels: torch.Tensor, heatmap: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gaussian focal loss on the heatmap + weighted L1 on the centre cells of real boxes."""
    pred = outputs["heatmap"].sigmoid().clamp(1e-4, 1 - 1e-4)
    pos = heatmap.ge(1 - 1e-4).float()
    num_pos = pos.sum().clamp(min=1.0)
    focal = -(pos * pred.log() * (1 - pred) ** 2 + (1 - pos) * (1 - heatmap) ** 4 * (1 - pred).log() * pred**2).sum() / num_pos
    size = pred.shape[-1]
    index, target = _regression_targets(boxes, size)
    maps = torch.cat([outputs[name] for name in ("reg", "height", "dim", "rot", "vel")], 1).flatten(2)   # [B, 10, S*S]
    gathered = maps.gather(2, index.unsqueeze(1).expand(-1, maps.shape[1], -1)).transpose(1, 2)
    valid = (labels >= 0).unsqueeze(-1).float()
    weights = torch.tensor(box_code.CODE_WEIGHTS, device=maps.device)
    l1 = ((gathered - target).abs() * weights * valid).sum() / valid.sum().clamp(min=1.0)
    return {"heatmap": focal, "bbox": 0.25 * l1}


def center_decode(outputs: dict[str, torch.Tensor], top_k: int = 64, min_score: float = 0.02) -> list[dict[str, torch.Tensor]]:
    """Peaks of the heatmap (3x3 max-pool NMS), top-k per sample -> boxes [K, 9], scores, labels."""
    heat = outputs["heatmap"].detach().sigmoid()
    heat = heat * (heat == F.max_pool2d(heat, 3, 1, 1))
    size = heat.shape[-1]
    scores, flat = heat.flatten(1).topk(top_k, dim=1)
    labels, cell = flat // (size * size), flat % (size * size)
    maps = torch.cat([outputs[name].detach() for name in ("reg", "height", "dim", "rot", "vel")], 1).flatten(2)
    reg = maps.gather(2, cell.unsqueeze(1).expand(-1, maps.shape[1], -1)).transpose(1, 2)   # [B, K, 10]
    cell_size = 2 * rig.RANGE / size
    x = ((cell % size).float() + reg[..., 0]) * cell_size - rig.RANGE
    y = ((cell // size).float() + reg[..., 1]) * cell_size - rig.RANGE
    boxes = box_code.decode(torch.cat([torch.stack([x, y], -1), reg[..., 2:]], -1))
    return box_code.per_sample(boxes, scores, labels, min_score)
