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


def test_culled_render_matches_a_float64_slab_test_over_every_pixel() -> None:
    # Reference: every ray against every box (no culling) in float64; the renderer tests each box
    # only inside its projected pixel rectangle, so a rectangle too small would lose pixels here.
    scene = scenes.sample_scene(torch.Generator().manual_seed(3))
    c2e, intrins = rig.cam2ego(*scene["cam_jitter"]), rig.intrinsics()
    _, depth, inst = scenes.render(c2e, intrins, scene["boxes"], scene["colours"], scene["sun"], scene["ground"], torch.zeros(1))
    vs, us = torch.meshgrid(torch.arange(rig.IMG_H) + 0.5, torch.arange(rig.IMG_W) + 0.5, indexing="ij")
    pix = torch.stack([us, vs, torch.ones_like(us)], -1).reshape(-1, 3).double()
    c2e64 = c2e.double()
    dirs = pix @ torch.linalg.inv(intrins.double()).T @ c2e64[:, :3, :3].transpose(1, 2)     # [6, HW, 3]
    origin = c2e64[:, None, :3, 3]
    best_t = torch.where(dirs[..., 2] < -1e-6, -origin[..., 2] / dirs[..., 2].clamp(max=-1e-6), torch.full(dirs.shape[:2], 1e4, dtype=torch.float64))
    best_id = torch.full(dirs.shape[:2], -1)
    for k, box in enumerate(scene["boxes"].double()):
        cos, sin = math.cos(box[6]), math.sin(box[6])
        rot = torch.tensor([[cos, sin, 0.0], [-sin, cos, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
        o_l, d_l = (origin - box[:3]) @ rot.T, dirs @ rot.T
        half = box[[4, 3, 5]] / 2
        t1, t2 = (-half - o_l) / d_l, (half - o_l) / d_l
        t_near, t_far = torch.minimum(t1, t2).amax(-1), torch.maximum(t1, t2).amin(-1)
        hit = (t_near <= t_far) & (t_near > 0) & (t_near < best_t)
        best_t, best_id = torch.where(hit, t_near, best_t), torch.where(hit, k, best_id)
    best_id = best_id.reshape(inst.shape)
    assert (best_id >= 0).sum() > 1000
    assert (best_id != inst).float().mean() < 1e-4
    same = (best_id == inst) & (depth > 0)
    assert torch.allclose(depth[same].double(), best_t.reshape(depth.shape)[same], rtol=1e-5)


def test_current_frame_only_sample_equals_the_two_frame_one(sample: dict[str, torch.Tensor]) -> None:
    single = scenes.make_sample(7, frames=1)
    assert single["imgs"].shape == (1, rig.NUM_CAMS, 3, rig.IMG_H, rig.IMG_W)
    assert torch.equal(single["imgs"][0], sample["imgs"][0])
    for key in sample.keys() - {"imgs"}:
        assert torch.equal(single[key], sample[key]), key
