"""DETR-style query heads (TinyBEVFormer, TinySparseBEV): box encoding, Hungarian loss, decoding.

Box predictions are [..., 10]: x, y normalised to [0, 1] over the range (sigmoid), z (m),
log w, log l, log h, sin yaw, cos yaw, vx, vy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from examples.bev import boxes as box_code
from examples.bev import rig
from examples.bev.matching import hungarian


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


def metric_code(bbox: torch.Tensor) -> torch.Tensor:
    """Predicted [..., 10] -> the box code of ``boxes.encode`` (x, y in metres, rest unchanged)."""
    return torch.cat([bbox[..., :2] * (2 * rig.RANGE) - rig.RANGE, bbox[..., 2:]], -1)


def _focal_cost(logits: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    prob = logits.sigmoid()
    pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    neg = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
    return pos - neg


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Summed sigmoid focal loss (RetinaNet), as torchvision's, which the examples do not depend on."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    return ((alpha * target + (1 - alpha) * (1 - target)) * ce * (1 - p_t) ** gamma).sum()


def query_loss(all_cls: torch.Tensor, all_bbox: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per decoder layer: Hungarian matching (2 x focal class cost + 0.25 x L1 centre in m), then
    sigmoid focal classification (weight 2) + 0.25 x weighted L1 on matched boxes, summed over layers."""
    layers, batch, queries, classes = all_cls.shape
    counts = (labels >= 0).sum(1).tolist()
    target = box_code.encode(boxes)
    weights = torch.tensor(box_code.CODE_WEIGHTS, device=all_bbox.device)
    total_cls, total_box = all_cls.new_zeros(()), all_cls.new_zeros(())
    for layer in range(layers):
        pred = metric_code(all_bbox[layer])
        with torch.no_grad():
            cls_cost = _focal_cost(all_cls[layer]).gather(2, labels.clamp(min=0).unsqueeze(1).expand(-1, queries, -1))
            cost = (2 * cls_cost + 0.25 * torch.cdist(pred[..., :2], target[..., :2], p=1)).cpu().numpy()
        cls_target = torch.zeros_like(all_cls[layer])
        box_loss = all_cls.new_zeros(())
        for b in range(batch):
            if counts[b] == 0:
                continue
            rows, cols = hungarian(cost[b, :, : counts[b]])
            q = torch.as_tensor(rows, device=all_cls.device)
            t = torch.as_tensor(cols, device=all_cls.device)
            cls_target[b, q, labels[b, t]] = 1.0
            box_loss = box_loss + ((pred[b, q] - target[b, t]).abs() * weights).sum()
        num = max(sum(counts), 1)
        total_cls = total_cls + 2.0 * sigmoid_focal_loss(all_cls[layer], cls_target) / num
        total_box = total_box + 0.25 * box_loss / num
    return {"cls": total_cls, "bbox": total_box}


def query_decode(all_cls: torch.Tensor, all_bbox: torch.Tensor, top_k: int = 64, min_score: float = 0.02) -> list[dict[str, torch.Tensor]]:
    """Last layer's top-k (query, class) pairs by sigmoid score -> boxes [K, 9], scores, labels."""
    cls, code = all_cls[-1].detach().sigmoid(), metric_code(all_bbox[-1].detach())
    batch, queries, classes = cls.shape
    scores, flat = cls.flatten(1).topk(min(top_k, queries * classes), dim=1)
    labels, query = flat % classes, flat // classes
    code = code.gather(1, query.unsqueeze(-1).expand(-1, -1, code.shape[-1]))
    return box_code.per_sample(box_code.decode(code), scores, labels, min_score)
