"""The synthetic scene set: determinism, geometry of the rendering, and its targets."""
from __future__ import annotations

import math

import pytest
import torch

from examples.bev import rig, scenes


@pytest.fixture(scope="module")
def sample() -> dict[str, torch.Tensor]:
    return scenes.make_sample(7)


def test_same_seed_gives_identical_tensors_and_other_seeds_differ(sample: dict[str, torch.Tensor]) -> None:
    a, b = sample, scenes.SceneDataset(seed=3, length=10)[4]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    other = scenes.sample_scene(torch.Generator().manual_seed(8))
    assert not torch.equal(scenes.sample_scene(torch.Generator().manual_seed(7))["boxes"], other["boxes"])


def test_box_centres_project_onto_their_own_rendered_pixels() -> None:
    # A centre seen from outside lies behind the box's own surface unless a nearer object occludes it.
    projected = own = 0
    for seed in range(3):
        scene = scenes.sample_scene(torch.Generator().manual_seed(seed))
        c2e, intrins = rig.cam2ego(*scene["cam_jitter"]), rig.intrinsics()
        _, depth, inst = scenes.render(c2e, intrins, scene["boxes"], scene["colours"], scene["sun"], scene["ground"], torch.zeros(1))
        cam = torch.cat([scene["boxes"][:, :3], torch.ones(len(scene["boxes"]), 1)], 1) @ rig.ego2img(c2e, intrins).transpose(1, 2)
        for k in range(len(scene["boxes"])):
            if scene["labels"][k] < 0 or (inst == k).sum() < scenes.MIN_PIXELS:
                continue
            for c in range(rig.NUM_CAMS):
                d = cam[c, k, 2].item()
                u, v = (int(cam[c, k, 0] / d), int(cam[c, k, 1] / d)) if d > 0 else (-1, -1)
                if 0 <= u < rig.IMG_W and 0 <= v < rig.IMG_H:
                    projected += 1
                    if inst[c, v, u] == k:
                        own += 1
                        assert d - math.hypot(*scene["boxes"][k, 3:6].tolist()) / 2 <= depth[c, v, u] < d
    assert projected >= 30 and own / projected >= 0.8


def test_targets_agree_with_boxes(sample: dict[str, torch.Tensor]) -> None:
    valid = sample["labels"] >= 0
    boxes, labels = sample["boxes"][valid], sample["labels"][valid]
    assert len(boxes) >= 3 and (boxes[:, :2].abs() < rig.RANGE).all()
    cells = ((boxes[:, :2] + rig.RANGE) / rig.BEV_CELL).long()
    assert (sample["heatmap"][labels, cells[:, 1], cells[:, 0]] == 1.0).all()
    assert int((sample["heatmap"] == 1.0).sum()) == len(boxes)
    # Depth is the camera z of the ray hit: unprojected ground pixels land on z = 0 in the ego frame.
    ground = (sample["instances"] == -1) & (sample["depth"] > 0)
    cam_idx, v, u = ground.nonzero()[::997].unbind(1)
    d = sample["depth"][cam_idx, v, u]
    k = sample["intrins"][cam_idx]
    x = (u + 0.5 - k[:, 0, 2]) / k[:, 0, 0] * d
    y = (v + 0.5 - k[:, 1, 2]) / k[:, 1, 1] * d
    ego = sample["cam2ego"][cam_idx] @ torch.stack([x, y, d, torch.ones_like(d)], 1).unsqueeze(-1)
    assert len(d) > 100 and ego[:, 2].abs().max() < 1e-3
    assert sample["imgs"].shape == (2, rig.NUM_CAMS, 3, rig.IMG_H, rig.IMG_W)
    assert torch.equal(sample["prev2cur"][3], torch.tensor([0.0, 0.0, 0.0, 1.0]))
