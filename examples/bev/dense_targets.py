"""Dense ground truth of a synthetic scene: road layout, BEV semantic map, 3D occupancy, camera visibility.

The road layout (drivable area) is a union of oriented rectangles in the current ego frame: the
ego's road, 0-2 crossing roads and 0-1 parking lot. It is drawn from its own generator, seeded
from the sample seed, so drawing it leaves the scene's other random draws (and so today's
detection samples) unchanged.

Labels (both grids are indexed ``[.., row = y, col = x]`` like every BEV map here):

- BEV map [S, S] on the models' grid (S = ``rig.BEV_SIZE``): 0 background, 1 drivable ground,
  2 + class for car / pedestrian / cone footprints. A footprint labels every cell it overlaps
  (exact rectangle-rectangle test), so a 0.4 m cone still marks its 1.25 m cell; where two
  footprints share a cell the smaller class wins (cone > pedestrian > car). Unlabelled
  distractors (poles, walls) are background.
- Occupancy [Z, S, S], Z = ``OCC_LAYERS`` layers of ``OCC_HEIGHT / Z`` m over 0-4 m: 0 free,
  1 ground (the bottom layer, which holds the ground surface), 2 + class for object voxels
  (footprint cells, layers whose bottom is below the box top), ``IGNORE`` for distractor
  voxels (occupied, but by no evaluated class).
- Visibility [Z, S, S] (Occ3D's camera mask): a voxel counts as observed when its centre
  projects into some current-frame camera and lies no more than ``VIS_TOLERANCE`` m (camera z)
  behind the first surface that camera's ray hit there (the rendered depth map; sky = infinitely far).
"""
from __future__ import annotations

import math

import torch

from examples.bev import rig

MAP_CLASSES = ("background", "drivable", "car", "pedestrian", "cone")
OCC_CLASSES = ("free", "ground", "car", "pedestrian", "cone")
IGNORE = 255
OCC_LAYERS = 8
OCC_HEIGHT = 4.0
OCC_DZ = OCC_HEIGHT / OCC_LAYERS
VIS_TOLERANCE = 0.9        # m: about half a voxel's diagonal, so the voxel a ray stops in counts as seen
ROAD_LENGTH = 200.0        # m: half length of a road rectangle, longer than any view


def layout_seed(seed: int) -> int:
    """The layout generator's seed: a fixed mix of the sample seed (another stream than the scene's)."""
    return (seed * 0x9E3779B1 + 0x7F4A7C15) % (1 << 62)


def sample_layout(gen: torch.Generator) -> torch.Tensor:
    """Drivable rectangles [R, 5]: centre x, y, half length, half width, yaw (rad)."""
    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand(1, generator=gen).item()

    heading, offset = u(-0.15, 0.15), u(-2.0, 2.0)
    rects = [[-math.sin(heading) * offset, math.cos(heading) * offset, ROAD_LENGTH, u(4.0, 8.0), heading]]
    for _ in range(int(torch.randint(0, 3, (1,), generator=gen))):
        along = u(-35.0, 35.0)
        rects.append([along * math.cos(heading), along * math.sin(heading), ROAD_LENGTH, u(3.0, 6.0), heading + math.pi / 2 + u(-0.3, 0.3)])
    if torch.rand(1, generator=gen).item() < 0.5:
        rects.append([u(-30.0, 30.0), u(-30.0, 30.0), u(6.0, 12.0), u(5.0, 10.0), u(-math.pi, math.pi)])
    return torch.tensor(rects)


def _rect_coords(points: torch.Tensor, rects: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates [..., R] of ``points`` [..., 2] along and across each rectangle [R, 5]."""
    rel = points[..., None, :] - rects[:, :2].to(points)
    cos, sin = rects[:, 4].cos().to(points), rects[:, 4].sin().to(points)
    return rel[..., 0] * cos + rel[..., 1] * sin, -rel[..., 0] * sin + rel[..., 1] * cos


def in_rects(points: torch.Tensor, rects: torch.Tensor) -> torch.Tensor:
    """Which of ``points`` [..., 2] lie in which rectangle [R, 5]: bool [..., R]."""
    along, across = _rect_coords(points, rects)
    return (along.abs() <= rects[:, 2].to(points)) & (across.abs() <= rects[:, 3].to(points))


def road_paint(points: torch.Tensor, rects: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(drivable [...], centre-line dash [...]) at ground points [..., 2]: what the renderer paints."""
    along, across = _rect_coords(points, rects)
    inside = (along.abs() <= rects[:, 2].to(points)) & (across.abs() <= rects[:, 3].to(points))
    road = rects[:, 2].to(points) >= ROAD_LENGTH          # lots carry no lane line
    dash = inside & road & (across.abs() < 0.12) & (torch.remainder(along, 6.0) < 3.0)
    return inside.any(-1), dash.any(-1)


def cell_centres(size: int = rig.BEV_SIZE) -> torch.Tensor:
    """Ego x, y [S, S, 2] of BEV cell centres (rows = y)."""
    centres = (torch.arange(size) + 0.5) * (2 * rig.RANGE / size) - rig.RANGE
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([x, y], -1)


def footprint_cells(boxes: torch.Tensor, size: int = rig.BEV_SIZE) -> torch.Tensor:
    """Which cells each box footprint overlaps (interiors intersect): bool [K, S, S].

    Separating-axis test between the oriented footprint and the axis-aligned cell: they overlap
    unless one of the four edge normals separates them."""
    half_cell = rig.RANGE / size
    centres = cell_centres(size)                                          # [S, S, 2]
    rel = centres[None] - boxes[:, None, None, :2]                        # [K, S, S, 2]
    cos, sin = boxes[:, 6].cos()[:, None, None], boxes[:, 6].sin()[:, None, None]
    half_l, half_w = boxes[:, 4][:, None, None] / 2, boxes[:, 3][:, None, None] / 2
    # Cell axes (x, y): the box's extent along each plus the cell's half size.
    sep_x = rel[..., 0].abs() >= half_cell + half_l * cos.abs() + half_w * sin.abs()
    sep_y = rel[..., 1].abs() >= half_cell + half_l * sin.abs() + half_w * cos.abs()
    # Box axes (length, width): the cell's extent along each plus the box's half size.
    along, across = rel[..., 0] * cos + rel[..., 1] * sin, -rel[..., 0] * sin + rel[..., 1] * cos
    sep_l = along.abs() >= half_l + half_cell * (cos.abs() + sin.abs())
    sep_w = across.abs() >= half_w + half_cell * (cos.abs() + sin.abs())
    return ~(sep_x | sep_y | sep_l | sep_w)


def _paint_order(labels: torch.Tensor) -> list[int]:
    """Box indices in painting order: distractors, then cars, pedestrians, cones (later ones win)."""
    return sorted(range(len(labels)), key=lambda k: (int(labels[k]), k))


def bev_map(boxes: torch.Tensor, labels: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """BEV semantic map [S, S] (uint8, ``MAP_CLASSES``) of a scene; see the module docstring."""
    out = in_rects(cell_centres(), layout).any(-1).to(torch.uint8)
    cells = footprint_cells(boxes)
    for k in _paint_order(labels):
        out[cells[k]] = 0 if labels[k] < 0 else 2 + int(labels[k])
    return out


def occupancy(boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Occupancy labels [Z, S, S] (uint8, ``OCC_CLASSES`` or ``IGNORE``); see the module docstring."""
    out = torch.zeros(OCC_LAYERS, rig.BEV_SIZE, rig.BEV_SIZE, dtype=torch.uint8)
    out[0] = 1
    cells = footprint_cells(boxes)
    bottoms = torch.arange(OCC_LAYERS) * OCC_DZ
    for k in _paint_order(labels):
        layers = bottoms < boxes[k, 2] + boxes[k, 5] / 2
        column = layers[:, None, None] & cells[k][None]
        out[column] = IGNORE if labels[k] < 0 else 2 + int(labels[k])
    return out


def voxel_centres() -> torch.Tensor:
    """Homogeneous ego coordinates [Z, S, S, 4] of the occupancy voxel centres."""
    xy = cell_centres()
    z = (torch.arange(OCC_LAYERS) + 0.5) * OCC_DZ
    xyz = torch.cat([xy[None].expand(OCC_LAYERS, -1, -1, -1), z[:, None, None, None].expand(-1, *xy.shape[:2], 1)], -1)
    return torch.cat([xyz, torch.ones_like(xyz[..., :1])], -1)


def visibility(depth: torch.Tensor, lidar2img: torch.Tensor) -> torch.Tensor:
    """Camera-visibility mask [Z, S, S] (bool) from the current frame's depth maps [6, H, W]."""
    cam = voxel_centres().to(depth).flatten(0, 2) @ lidar2img.to(depth).transpose(-1, -2)     # [6, V, 4]
    d = cam[..., 2]
    u = (cam[..., 0] / d.clamp(min=1e-3)).floor()
    v = (cam[..., 1] / d.clamp(min=1e-3)).floor()
    inside = (d > 1e-3) & (u >= 0) & (u < rig.IMG_W) & (v >= 0) & (v < rig.IMG_H)
    flat = (v.clamp(0, rig.IMG_H - 1) * rig.IMG_W + u.clamp(0, rig.IMG_W - 1)).long()
    surface = depth.flatten(1).gather(1, flat)
    surface = torch.where(surface > 0, surface, torch.full_like(surface, math.inf))   # sky: nothing in the way
    seen = inside & (d <= surface + VIS_TOLERANCE)
    return seen.any(0).view(OCC_LAYERS, rig.BEV_SIZE, rig.BEV_SIZE)
