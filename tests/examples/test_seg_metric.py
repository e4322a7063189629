"""Confusion-matrix mIoU against a brute-force recount on random label maps (ignore label, mask)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from examples.bev.seg_metric import ConfusionMatrix

CLASSES = ("empty", "a", "b", "c", "d")


def _brute_force(preds: list[np.ndarray], labels: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, float]:
    pred, label, mask = (np.concatenate([x.ravel() for x in xs]) for xs in (preds, labels, masks))
    valid = mask & (label != 255)
    out = {}
    for c, name in enumerate(CLASSES):
        inter = sum(1 for p, l, v in zip(pred, label, valid) if v and p == c and l == c)
        union = sum(1 for p, l, v in zip(pred, label, valid) if v and (p == c or l == c))
        out[f"iou_{name}"] = inter / union if union else math.nan
    counted = [out[f"iou_{n}"] for n in CLASSES[1:] if not math.isnan(out[f"iou_{n}"])]
    out["mIoU"] = sum(counted) / len(counted)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_miou_equals_brute_force_on_random_maps(seed: int) -> None:
    rng = np.random.default_rng(seed)
    matrix = ConfusionMatrix(CLASSES, mean_over=CLASSES[1:])
    preds, labels, masks = [], [], []
    for _ in range(3):
        shape = (2, 3, 7, 9)
        # Class 4 never appears when seed is even: a NaN IoU must drop out of the mean.
        top = 4 if seed % 2 == 0 else 5
        label = rng.integers(0, top, shape)
        label[rng.random(shape) < 0.1] = 255
        pred = np.where(rng.random(shape) < 0.6, np.where(label == 255, 0, label), rng.integers(0, top, shape))
        mask = rng.random(shape) < 0.8
        matrix.update(torch.from_numpy(pred), torch.from_numpy(label).to(torch.uint8), torch.from_numpy(mask))
        preds.append(pred), labels.append(label), masks.append(mask)
    found, expected = matrix.result(), _brute_force(preds, labels, masks)
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        assert (math.isnan(value) and math.isnan(found[key])) or found[key] == pytest.approx(value, abs=1e-12), key
    assert math.isnan(found["iou_d"]) == (seed % 2 == 0)


def test_perfect_and_disjoint_predictions() -> None:
    label = torch.tensor([[0, 1, 2], [3, 4, 1]])
    perfect = ConfusionMatrix(CLASSES, mean_over=CLASSES[1:])
    perfect.update(label, label)
    assert perfect.result()["mIoU"] == 1.0
    wrong = ConfusionMatrix(CLASSES)
    wrong.update((label + 1) % 5, label)
    assert wrong.result()["mIoU"] == 0.0


def test_rejects_bad_inputs() -> None:
    matrix = ConfusionMatrix(CLASSES)
    with pytest.raises(ValueError, match="one shape"):
        matrix.update(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        matrix.update(torch.full((2,), 7), torch.zeros(2))
    with pytest.raises(ValueError, match="not among the classes"):
        ConfusionMatrix(CLASSES, mean_over=("e",))
