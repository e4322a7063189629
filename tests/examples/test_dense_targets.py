"""Dense targets of the scenes: the layout leaves detection samples alone, map and occupancy agree
with the boxes (point-sampled footprints, heights), and visibility agrees with an analytic ray test."""
from __future__ import annotations

import math

import pytest
import torch

from examples.bev import dense_targets as dt
from examples.bev import rig, scenes

SEEDS = (7, 11)


@pytest.fixture(scope="module")
def dense() -> dict[int, dict[str, torch.Tensor]]:
    return {seed: scenes.make_sample(seed, frames=1, dense=True) for seed in SEEDS}


def _scene(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    scene = scenes.sample_scene(torch.Generator().manual_seed(seed))
    return scene["boxes"].double(), scene["labels"]


def _footprint_points(box: torch.Tensor, step: float = 0.05) -> torch.Tensor:
    """Points [N, 2] on a grid over a box footprint (its own frame, rotated by a rotation matrix)."""
    ls = torch.arange(-box[4] / 2, box[4] / 2 + 1e-9, step, dtype=torch.float64)
    ws = torch.arange(-box[3] / 2, box[3] / 2 + 1e-9, step, dtype=torch.float64)
    local = torch.stack(torch.meshgrid(ls, ws, indexing="ij"), -1).reshape(-1, 2)
    rot = torch.tensor([[math.cos(box[6]), -math.sin(box[6])], [math.sin(box[6]), math.cos(box[6])]], dtype=torch.float64)
    return local @ rot.T + box[:2]


def _cells(points: torch.Tensor) -> set[tuple[int, int]]:
    idx = ((points + rig.RANGE) / rig.BEV_CELL).floor().long()
    inside = ((idx >= 0) & (idx < rig.BEV_SIZE)).all(-1)
    return {(int(r), int(c)) for c, r in idx[inside].tolist()}        # (row = y, col = x)


def test_dense_leaves_the_detection_sample_unchanged_but_images(dense: dict[int, dict[str, torch.Tensor]]) -> None:
    plain = scenes.make_sample(SEEDS[0], frames=1)
    assert not {"bev_map", "occupancy", "occ_mask", "layout"} & plain.keys()
    for key, value in plain.items():
        if key != "imgs":
            assert torch.equal(value, dense[SEEDS[0]][key]), key
    assert not torch.equal(plain["imgs"], dense[SEEDS[0]]["imgs"])      # the road is painted


def test_dense_sample_is_deterministic(dense: dict[int, dict[str, torch.Tensor]]) -> None:
    again = scenes.SceneDataset(SEEDS[0], 1, frames=1, dense=True)[0]
    for key, value in dense[SEEDS[0]].items():
        assert torch.equal(value, again[key]), key
    assert not torch.equal(dense[SEEDS[0]]["bev_map"], dense[SEEDS[1]]["bev_map"])


def test_every_footprint_is_labelled_and_the_rest_follows_the_layout(dense: dict[int, dict[str, torch.Tensor]]) -> None:
    for seed, sample in dense.items():
        boxes, labels = _scene(seed)
        bev = sample["bev_map"].long()
        touched: dict[tuple[int, int], set[int]] = {}
        for box, label in zip(boxes, labels.tolist()):
            cells = _cells(_footprint_points(box))
            for cell in cells:
                touched.setdefault(cell, set()).add(label)
            if label >= 0 and cells:
                # Smaller classes win shared cells; a box keeps at least one cell of its own class.
                assert all(bev[cell] >= 2 + label for cell in cells), (seed, box)
                assert any(bev[cell] == 2 + label for cell in cells), (seed, box)
        for (r, c), value in zip(torch.cartesian_prod(torch.arange(64), torch.arange(64)).tolist(), bev.flatten().tolist()):
            if value >= 2:
                assert value - 2 in touched.get((r, c), set()) or _near_box(boxes, labels, value - 2, r, c)
        # Cells no footprint touches: drivable exactly where a layout rectangle holds the centre.
        centres = (torch.arange(64, dtype=torch.float64) + 0.5) * rig.BEV_CELL - rig.RANGE
        y, x = torch.meshgrid(centres, centres, indexing="ij")
        drivable = torch.zeros(64, 64, dtype=torch.bool)
        for cx, cy, hl, hw, yaw in sample["layout"].double().tolist():
            rot = torch.tensor([[math.cos(yaw), math.sin(yaw)], [-math.sin(yaw), math.cos(yaw)]], dtype=torch.float64)
            local = torch.stack([x - cx, y - cy], -1) @ rot.T
            drivable |= (local[..., 0].abs() <= hl) & (local[..., 1].abs() <= hw)
        free = torch.ones(64, 64, dtype=torch.bool)
        free[tuple(torch.tensor(sorted(touched)).T)] = False
        free &= torch.from_numpy(_no_overlap(boxes))
        assert torch.equal(bev[free], drivable[free].long())
        assert drivable.float().mean() > 0.05


def _no_overlap(boxes: torch.Tensor) -> object:
    """Cells no box footprint overlaps, by the separating-axis test of dense_targets (shared edges excluded)."""
    return (~dt.footprint_cells(boxes.float()).any(0)).numpy()


def _near_box(boxes: torch.Tensor, labels: torch.Tensor, label: int, r: int, c: int) -> bool:
    """Whether a box of ``label`` comes within 0.06 m of cell (r, c): footprint point sampling misses slivers."""
    lo = torch.tensor([c, r], dtype=torch.float64) * rig.BEV_CELL - rig.RANGE - 0.06
    hi = lo + rig.BEV_CELL + 0.12
    return any(((_footprint_points(b) >= lo) & (_footprint_points(b) <= hi)).all(-1).any() for b, l in zip(boxes, labels) if l == label)


def test_occupancy_columns_have_the_box_heights(dense: dict[int, dict[str, torch.Tensor]]) -> None:
    checked = 0
    for seed, sample in dense.items():
        boxes, labels = _scene(seed)
        occ = sample["occupancy"].long()
        owners: dict[tuple[int, int], list[int]] = {}
        for k, box in enumerate(boxes):
            for cell in _cells(_footprint_points(box)):
                owners.setdefault(cell, []).append(k)
        for (r, c), ks in owners.items():
            if len(ks) != 1:
                continue
            box, label = boxes[ks[0]], int(labels[ks[0]])
            expected = dt.IGNORE if label < 0 else 2 + label
            layers = math.ceil(float(box[5]) / dt.OCC_DZ - 1e-9)          # box top at its height (it stands on z = 0)
            column = occ[:, r, c].tolist()
            assert column[:layers] == [expected] * layers and column[layers:] == [0] * (dt.OCC_LAYERS - layers), (seed, box, column)
            checked += 1
        untouched = torch.from_numpy(_no_overlap(boxes))
        assert (occ[0][untouched] == 1).all() and (occ[1:][:, untouched] == 0).all()
    assert checked > 40


def _ray_box_t(origin: torch.Tensor, direction: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Entry distance along rays [N, 3] into an oriented box (inf where missed), slab test in float64."""
    c, s = math.cos(box[6]), math.sin(box[6])
    rot = torch.tensor([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    o, d = rot @ (origin - box[:3]), direction @ rot.T
    half = box[[4, 3, 5]] / 2
    d = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
    t1, t2 = (-half - o) / d, (half - o) / d
    near, far = torch.minimum(t1, t2).amax(-1), torch.maximum(t1, t2).amin(-1)
    return torch.where((near <= far) & (far > 0), near.clamp(min=0), torch.full_like(near, math.inf))


def test_visibility_agrees_with_an_analytic_ray_test(dense: dict[int, dict[str, torch.Tensor]]) -> None:
    seed = SEEDS[0]
    sample, (boxes, _) = dense[seed], _scene(seed)
    centres = dt.voxel_centres()[..., :3].reshape(-1, 3).double()
    pick = torch.randperm(len(centres), generator=torch.Generator().manual_seed(0))[:3000]
    points = centres[pick]
    seen = torch.zeros(len(points), dtype=torch.bool)
    c2e, k = sample["cam2ego"].double(), sample["intrins"][0].double()
    for cam in range(rig.NUM_CAMS):
        origin = c2e[cam, :3, 3]
        local = (points - origin) @ c2e[cam, :3, :3]                     # camera frame: z forward
        uv = local[:, :2] / local[:, 2:].clamp(min=1e-3) @ k[:2, :2].T + k[:2, 2]
        inside = (local[:, 2] > 1e-3) & (uv[:, 0] >= 0) & (uv[:, 0] < rig.IMG_W) & (uv[:, 1] >= 0) & (uv[:, 1] < rig.IMG_H)
        direction = (points - origin) / local[:, 2:]                      # unit camera z: t is depth
        hit = torch.stack([_ray_box_t(origin, direction, box) for box in boxes]).amin(0)
        ground = torch.where(direction[:, 2] < -1e-9, -origin[2] / direction[:, 2], torch.full_like(hit, math.inf))
        seen |= inside & (local[:, 2] <= torch.minimum(hit, ground) + dt.VIS_TOLERANCE)
    mask = sample["occ_mask"].flatten()[pick]
    agree = (mask == seen).double().mean()
    assert agree > 0.97, agree
    assert 0.3 < mask.double().mean() < 0.99
    # High voxels right beside the ego lie above every camera's vertical field of view.
    assert not sample["occ_mask"][-1, 30:34, 30:34].any()
