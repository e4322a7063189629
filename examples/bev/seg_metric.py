"""Semantic mIoU for BEV maps and occupancy grids, accumulated over a whole evaluation set (Occ3D style).

A confusion matrix over every evaluated cell/voxel of every sample is summed first; class c's
IoU is ``TP / (TP + FP + FN)`` from it, NaN when the class is in neither labels nor predictions.
mIoU is the mean over the classes named in ``mean_over`` that are not NaN (Occ3D leaves out
``free``; for BEV maps ``background`` is left out the same way). Cells whose label is ``ignore``
or that fall outside ``mask`` (Occ3D's camera-visibility mask) are not evaluated.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class ConfusionMatrix:
    """Accumulates predictions against labels; ``result()`` gives per-class IoU and mIoU."""

    def __init__(self, classes: Sequence[str], mean_over: Sequence[str] | None = None, ignore: int = 255) -> None:
        unknown = set(mean_over or ()) - set(classes)
        if unknown:
            raise ValueError(f"ConfusionMatrix: mean_over names {sorted(unknown)}, which are not among the classes {list(classes)}")
        self.classes, self.ignore = tuple(classes), ignore
        self.mean_over = tuple(mean_over) if mean_over is not None else self.classes
        self.matrix = torch.zeros(len(classes), len(classes), dtype=torch.long)   # [label, prediction]

    def update(self, prediction: torch.Tensor, label: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add predicted class ids and labels of one batch (same shape; optional bool ``mask``)."""
        if prediction.shape != label.shape or (mask is not None and mask.shape != label.shape):
            raise ValueError(f"ConfusionMatrix.update: prediction {tuple(prediction.shape)}, label {tuple(label.shape)} "
                             f"and mask {None if mask is None else tuple(mask.shape)} must have one shape")
        label, prediction = label.long().flatten(), prediction.long().flatten()
        keep = label != self.ignore
        if mask is not None:
            keep &= mask.flatten().bool()
        n = len(self.classes)
        if ((prediction[keep] < 0) | (prediction[keep] >= n) | (label[keep] >= n) | (label[keep] < 0)).any():
            raise ValueError(f"ConfusionMatrix.update: class ids must lie in [0, {n}) (or equal ignore={self.ignore} in labels)")
        pairs = label[keep] * n + prediction[keep]
        self.matrix += torch.bincount(pairs, minlength=n * n).view(n, n).cpu()

    def iou(self) -> dict[str, float]:
        tp = self.matrix.diag().double()
        union = self.matrix.sum(0).double() + self.matrix.sum(1).double() - tp
        return {name: (float(tp[c] / union[c]) if union[c] > 0 else math.nan) for c, name in enumerate(self.classes)}

    def result(self) -> dict[str, float]:
        """``iou_<class>`` for every class and ``mIoU`` over ``mean_over`` (NaN classes left out)."""
        ious = self.iou()
        counted = [ious[name] for name in self.mean_over if not math.isnan(ious[name])]
        out = {f"iou_{name}": value for name, value in ious.items()}
        out["mIoU"] = sum(counted) / len(counted) if counted else math.nan
        return out
