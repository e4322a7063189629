"""nuScenes-style detection metric in numpy: mAP over centre-distance thresholds, TP errors, NDS-like.

AP follows nuScenes ``calc_ap``: detections of a class, over all samples, sorted by score, each
greedily matched to the nearest unmatched ground truth of its sample (BEV centre distance below
the threshold); precision interpolated at 101 recall points, precision and recall below 0.1 cut,
normalised. mAP is the mean over classes that have ground truth and over thresholds {0.5, 1, 2, 4} m.
True-positive errors are taken at 2 m as plain means over matched pairs (nuScenes averages them
over recall bins instead): ATE (centre distance, m), ASE (1 - IoU of the aligned sizes), AOE
(yaw difference, rad; not for cones) and AVE (velocity error, m/s; not for cones). The NDS-like
score is ``(5 mAP + sum over the four errors of (1 - min(1, err))) / 9`` (nuScenes' NDS has a fifth,
attribute error, and divides by 10); it is not comparable with nuScenes numbers.
"""
from __future__ import annotations

import numpy as np
import torch

from examples.bev import rig

THRESHOLDS = (0.5, 1.0, 2.0, 4.0)
TP_THRESHOLD = 2.0
ERRORS = ("ate", "ase", "aoe", "ave")
NO_ORIENTATION = {"cone"}


def ground_truth(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Padded batch boxes/labels -> one dict of real boxes and labels per sample."""
    return [{"boxes": b[l >= 0], "labels": l[l >= 0]} for b, l in zip(batch["boxes"].cpu(), batch["labels"].cpu())]


def _errors(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, float, float]:
    ate = float(np.hypot(*(pred[:2] - gt[:2])))
    inter = np.prod(np.minimum(pred[3:6], gt[3:6]))
    ase = 1.0 - float(inter / (np.prod(pred[3:6]) + np.prod(gt[3:6]) - inter))
    aoe = float(abs((pred[6] - gt[6] + np.pi) % (2 * np.pi) - np.pi))
    ave = float(np.hypot(*(pred[7:9] - gt[7:9])))
    return ate, ase, aoe, ave


def _match(dets: list[tuple[float, int, np.ndarray]], gts: list[np.ndarray], threshold: float) -> tuple[np.ndarray, list[tuple[float, ...]]]:
    """Greedy nuScenes matching: (tp flags in score order, errors of each true positive)."""
    taken = [np.zeros(len(g), dtype=bool) for g in gts]
    flags, errors = [], []
    for _, sample, box in dets:
        cands = gts[sample]
        if len(cands):
            dist = np.hypot(cands[:, 0] - box[0], cands[:, 1] - box[1])
            dist[taken[sample]] = np.inf
            best = int(np.argmin(dist))
            if dist[best] < threshold:
                taken[sample][best] = True
                flags.append(True)
                errors.append(_errors(box, cands[best]))
                continue
        flags.append(False)
    return np.array(flags, dtype=bool), errors


def average_precision(tp: np.ndarray, num_gt: int, min_recall: float = 0.1, min_precision: float = 0.1) -> float:
    """nuScenes ``calc_ap`` from TP flags in descending score order."""
    if num_gt == 0 or len(tp) == 0:
        return 0.0
    tps, fps = np.cumsum(tp), np.cumsum(~tp)
    precision, recall = tps / (tps + fps), tps / num_gt
    precision = np.interp(np.linspace(0, 1, 101), recall, precision, right=0)
    precision = precision[round(100 * min_recall) + 1 :] - min_precision
    return float(np.clip(precision, 0, None).mean() / (1 - min_precision))


def evaluate(predictions: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """mAP, per-class AP, mean TP errors and the NDS-like score over a list of samples."""
    if len(predictions) != len(targets):
        raise ValueError(f"evaluate: {len(predictions)} predictions for {len(targets)} samples")
    result: dict[str, float] = {}
    class_aps, class_errors = [], {e: [] for e in ERRORS}
    for cls, name in enumerate(rig.CLASSES):
        gts = [t["boxes"][t["labels"] == cls].double().numpy() for t in targets]
        num_gt = sum(len(g) for g in gts)
        if num_gt == 0:
            continue
        dets = [(float(s), i, b) for i, p in enumerate(predictions)
                for s, b in zip(p["scores"][p["labels"] == cls].tolist(), p["boxes"][p["labels"] == cls].double().numpy())]
        dets.sort(key=lambda d: -d[0])
        aps = []
        for threshold in THRESHOLDS:
            tp, errors = _match(dets, gts, threshold)
            aps.append(average_precision(tp, num_gt))
            result[f"ap_{name}_{threshold:g}m"] = aps[-1]
            if threshold == TP_THRESHOLD and errors:
                means = np.mean(np.array(errors), 0)
                for key, value in zip(ERRORS, means):
                    if not (name in NO_ORIENTATION and key in ("aoe", "ave")):
                        class_errors[key].append(float(value))
        result[f"ap_{name}"] = float(np.mean(aps))
        class_aps.append(result[f"ap_{name}"])
    result["mAP"] = float(np.mean(class_aps)) if class_aps else 0.0
    for key in ERRORS:
        result[f"m{key.upper()}"] = float(np.mean(class_errors[key])) if class_errors[key] else 1.0
    result["NDS_like"] = (5 * result["mAP"] + sum(1 - min(1.0, result[f"m{k.upper()}"]) for k in ERRORS)) / 9
    return result
