"""Hand cases for examples/bev/metric.py and the Hungarian matcher against brute force."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from examples.bev.matching import hungarian
from examples.bev.metric import evaluate


def _targets() -> list[dict[str, torch.Tensor]]:
    boxes = torch.tensor([[10.0, 5.0, 0.8, 1.9, 4.5, 1.6, 0.3, 2.0, 0.0],
                          [-12.0, 20.0, 0.9, 0.7, 0.7, 1.7, 1.0, 0.5, 0.5],
                          [3.0, -25.0, 0.4, 0.4, 0.4, 0.8, 0.0, 0.0, 0.0]])
    return [{"boxes": boxes, "labels": torch.tensor([0, 1, 2])}, {"boxes": boxes[:1] + 3.0, "labels": torch.tensor([0])}]


def _as_predictions(targets: list[dict[str, torch.Tensor]], shift: float = 0.0) -> list[dict[str, torch.Tensor]]:
    preds = []
    for t in targets:
        boxes = t["boxes"].clone()
        boxes[:, 0] += shift
        preds.append({"boxes": boxes, "scores": torch.linspace(0.9, 0.5, len(boxes)), "labels": t["labels"]})
    return preds


def test_perfect_detections_score_one() -> None:
    result = evaluate(_as_predictions(_targets()), _targets())
    assert result["mAP"] == pytest.approx(1.0)
    assert result["mATE"] == pytest.approx(0.0) and result["mASE"] == pytest.approx(0.0)
    assert result["NDS_like"] == pytest.approx(1.0)


def test_no_detections_score_zero() -> None:
    empty = [{"boxes": torch.zeros(0, 9), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    assert evaluate(empty, _targets())["mAP"] == 0.0


def test_shift_of_one_and_a_half_metres_matches_only_at_two_and_four() -> None:
    result = evaluate(_as_predictions(_targets(), shift=1.5), _targets())
    for name in ("car", "pedestrian", "cone"):
        assert [result[f"ap_{name}_{t}m"] for t in ("0.5", "1", "2", "4")] == pytest.approx([0.0, 0.0, 1.0, 1.0])
    assert result["mAP"] == pytest.approx(0.5)
    assert result["mATE"] == pytest.approx(1.5)


def test_false_positive_ranked_first_lowers_ap() -> None:
    preds = _as_predictions(_targets())
    preds[0]["boxes"] = torch.cat([preds[0]["boxes"], torch.tensor([[30.0, 30.0, 0.8, 1.9, 4.5, 1.6, 0.0, 0.0, 0.0]])])
    preds[0]["scores"] = torch.cat([preds[0]["scores"], torch.tensor([0.99])])
    preds[0]["labels"] = torch.cat([preds[0]["labels"], torch.tensor([0])])
    result = evaluate(preds, _targets())
    # Car precision is 0 at the first detection, then 1/2, 2/3 at recalls 0.5 and 1: nuScenes interpolation.
    recall = np.linspace(0, 1, 101)
    precision = np.interp(recall, [0.0, 0.5, 1.0], [0.0, 0.5, 2 / 3], right=0)[11:] - 0.1
    assert result["ap_car"] == pytest.approx(np.clip(precision, 0, None).mean() / 0.9)
    assert result["ap_pedestrian"] == pytest.approx(1.0)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (5, 3), (4, 4), (2, 6)])
def test_hungarian_matches_brute_force(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    for _ in range(20):
        cost = rng.random(shape)
        rows, cols = hungarian(cost)
        n, m = shape
        if n <= m:
            best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
        else:
            best = min(sum(cost[p[j], j] for j in range(m)) for p in itertools.permutations(range(n), m))
        assert len(set(rows.tolist())) == len(rows) == min(n, m) == len(set(cols.tolist()))
        assert cost[rows, cols].sum() == pytest.approx(best)
