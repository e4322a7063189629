"""Seeded procedural driving scenes, ray-cast into the six-camera rig, with detection targets.

Sample ``i`` of ``SceneDataset(seed)`` is a pure function of ``seed + i``: the scene (cars,
pedestrians and cones on the ground plane plus unlabelled poles and walls, ego and object motion
between two frames 0.5 s apart) is drawn with a CPU ``torch.Generator``, then both frames (or the
current one only) are rendered by vectorised ray casting (ground plane + oriented-box slab test,
each box only over the pixel rectangle its projection covers) on any device, which gives images,
per-pixel depth and instance ids. Labels keep only objects inside the range that cover at least
``MIN_PIXELS`` pixels of the current frame (nuScenes keeps boxes with lidar hits).
"""
from __future__ import annotations

import math

import torch

from examples.bev import dense_targets, rig

MAX_BOXES = 32
MAX_RECTS = 4         # drivable rectangles of a layout: the ego road, up to 2 crossings, a lot
MIN_PIXELS = 6
# length, width, height (m) per class; pedestrians and cones are square in plan.
CLASS_SIZES = torch.tensor([[4.5, 1.9, 1.6], [0.7, 0.7, 1.75], [0.4, 0.4, 0.8]])
CLASS_SPEEDS = (8.0, 1.5, 0.0)
CLASS_WEIGHTS = torch.tensor([0.5, 0.25, 0.25])
BOX_FIELDS = ("x", "y", "z", "w", "l", "h", "yaw", "vx", "vy")


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def sample_scene(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Draw one scene: boxes [K, 9] (BOX_FIELDS, current ego frame), labels [K] (-1 = distractor), colours."""
    count = int(torch.poisson(torch.tensor(18.0), generator=gen).clamp(4, MAX_BOXES))
    classes = torch.multinomial(CLASS_WEIGHTS, count, replacement=True, generator=gen)
    n_distract = int(torch.randint(2, 7, (1,), generator=gen))
    kept: list[list[float]] = []
    labels: list[int] = []
    for k in range(count + n_distract):
        cls = int(classes[k]) if k < count else -1
        if cls >= 0:
            length, width, height = (CLASS_SIZES[cls] * _uniform(gen, 3, 0.9, 1.1)).tolist()
        else:  # pole or wall segment: never labelled, only in the way
            length, width, height = _uniform(gen, 1, 0.3, 6.0).item(), 0.3, _uniform(gen, 1, 1.0, 4.0).item()
        for _ in range(20):  # rejection sampling against overlap and the ego vehicle
            x, y = _uniform(gen, 2, -rig.RANGE - 4, rig.RANGE + 4).tolist()
            radius = 0.5 * math.hypot(length, width)
            if abs(x) < 3.5 + radius and abs(y) < 2.0 + radius:
                continue
            if all(math.hypot(x - b[0], y - b[1]) > radius + b[9] + 0.3 for b in kept):
                break
        else:
            continue
        yaw = _uniform(gen, 1, -math.pi, math.pi).item()
        speed = _uniform(gen, 1, 0.0, CLASS_SPEEDS[cls]).item() if cls >= 0 and torch.rand(1, generator=gen) < 0.6 else 0.0
        kept.append([x, y, height / 2, width, length, height, yaw, speed * math.cos(yaw), speed * math.sin(yaw), radius])
        labels.append(cls)
    boxes = torch.tensor(kept)[:, :9]
    labels_t = torch.tensor(labels)
    palette = torch.rand(len(labels), 3, generator=gen) * 0.8 + 0.1
    cone = torch.tensor([1.0, 0.45, 0.1]) + 0.08 * torch.randn(len(labels), 3, generator=gen)
    grey = 0.35 + 0.3 * torch.rand(len(labels), 1, generator=gen).expand(-1, 3)
    colours = torch.where((labels_t == 2)[:, None], cone, torch.where((labels_t == -1)[:, None], grey, palette))
    speed, yaw_rate = _uniform(gen, 1, 0.0, 12.0).item(), _uniform(gen, 1, -0.3, 0.3).item()
    return {
        "boxes": boxes, "labels": labels_t, "colours": colours.clamp(0, 1),
        "ego": torch.tensor([speed, yaw_rate]),
        "cam_jitter": torch.randn(2, rig.NUM_CAMS, generator=gen) * math.radians(1.0),
        "sun": torch.nn.functional.normalize(torch.tensor([*_uniform(gen, 2, -1, 1).tolist(), 1.5]), dim=0),
        "ground": _uniform(gen, 2, 0.3, 0.55),
    }


def prev2cur(ego: torch.Tensor) -> torch.Tensor:
    """Pose [4, 4] of the previous ego frame in the current one, from (speed, yaw rate)."""
    speed, yaw_rate = ego.tolist()
    theta = -yaw_rate * rig.FRAME_DT
    dist = speed * rig.FRAME_DT
    mat = torch.eye(4)
    mat[:2, :2] = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    mat[0, 3], mat[1, 3] = -dist * math.cos(theta / 2), -dist * math.sin(theta / 2)
    return mat


def _box_rotations(boxes: torch.Tensor) -> torch.Tensor:
    """World -> box rotations [K, 3, 3] from the yaw column of ``boxes`` [K, 9]."""
    cos, sin, zero = boxes[:, 6].cos(), boxes[:, 6].sin(), torch.zeros_like(boxes[:, 6])
    return torch.stack([cos, sin, zero, -sin, cos, zero, zero, zero, zero + 1], -1).unflatten(-1, (3, 3))


NEAR = 1e-3   # m: the near plane boxes are clipped at when bounding their image rectangles
_CORNER_SIGNS = torch.tensor([[sx, sy, sz] for sx in (-1.0, 1.0) for sy in (-1.0, 1.0) for sz in (-1.0, 1.0)])
_EDGES = torch.tensor([(a, b) for a in range(8) for b in range(a + 1, 8) if bin(a ^ b).count("1") == 1])


def pixel_rects(cam2world: torch.Tensor, intrins: torch.Tensor, boxes: torch.Tensor) -> list[list[tuple[int, int, int, int, int]]]:
    """Per camera, ``(box, v0, v1, u0, u1)`` pixel rectangles (end exclusive) that hold every pixel whose
    centre ray can hit the box: the bounds, plus one pixel, of the projected box clipped at ``NEAR``
    (its corners in front and its edges' crossings of the near plane); boxes out of view are left out."""
    half = boxes[:, [4, 3, 5]] / 2
    corners = boxes[:, None, :3] + (_CORNER_SIGNS * half[:, None]) @ _box_rotations(boxes)      # [K, 8, 3]
    world2cam = rig.rigid_inverse(cam2world.cpu().float())
    cam = corners[None] @ world2cam[:, None, :3, :3].transpose(-1, -2) + world2cam[:, None, None, :3, 3]  # [6, K, 8, 3]
    a, b = cam[:, :, _EDGES[:, 0]], cam[:, :, _EDGES[:, 1]]
    share = ((NEAR - a[..., 2]) / (b[..., 2] - a[..., 2]))[..., None]
    points = torch.cat([cam, a + share * (b - a)], 2)
    keep = torch.cat([cam[..., 2] >= NEAR, (a[..., 2] - NEAR) * (b[..., 2] - NEAR) < 0], 2)
    uv = (points @ intrins.cpu().float().T)[..., :2] / points[..., 2:].clamp(min=NEAR)
    lo = torch.where(keep[..., None], uv, torch.inf).amin(2).floor() - 1
    hi = torch.where(keep[..., None], uv, -torch.inf).amax(2).ceil() + 1
    limit = torch.tensor([rig.IMG_W, rig.IMG_H], dtype=lo.dtype)
    lo, hi = torch.minimum(lo.clamp(min=0), limit), torch.minimum(hi.clamp(min=0), limit)
    rects: list[list[tuple[int, int, int, int, int]]] = []
    for lo_c, hi_c in zip(lo.int().tolist(), hi.int().tolist()):
        rects.append([(k, v0, v1, u0, u1) for k, ((u0, v0), (u1, v1)) in enumerate(zip(lo_c, hi_c)) if u0 < u1 and v0 < v1])
    return rects


def render(cam2world: torch.Tensor, intrins: torch.Tensor, boxes: torch.Tensor, colours: torch.Tensor,
           sun: torch.Tensor, ground: torch.Tensor, noise: torch.Tensor, layout: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Ray-cast one frame: images [6, 3, H, W], depth [6, H, W] (0 = sky), instance ids [6, H, W] (-1 = none).

    Each box is slab-tested only against the rays of its ``pixel_rects`` rectangle in each camera (the
    nearest hit wins, the lower box index on ties); the other rays cannot hit it. With a road
    ``layout`` (``dense_targets.sample_layout``) the ground is painted as asphalt with centre-line
    dashes where drivable and as greener terrain elsewhere; without one it is one uniform surface."""
    dev = cam2world.device
    vs, us = torch.meshgrid(torch.arange(rig.IMG_H, device=dev) + 0.5, torch.arange(rig.IMG_W, device=dev) + 0.5, indexing="ij")
    pix = torch.stack([us, vs, torch.ones_like(us)], -1).reshape(-1, 3)
    cam_dirs = pix @ torch.linalg.inv(intrins).T                     # camera z = 1, so ray t is depth
    dirs = cam_dirs @ cam2world[:, :3, :3].transpose(1, 2)            # [6, HW, 3]
    origin = cam2world[:, None, :3, 3].expand_as(dirs)
    far = torch.full(dirs.shape[:2], 1e4, device=dev)
    t_ground = torch.where(dirs[..., 2] < -1e-6, -origin[..., 2] / dirs[..., 2].clamp(max=-1e-6), far)
    best_t, best_id = t_ground.clone(), torch.full_like(t_ground, -1, dtype=torch.long)
    best_normal = torch.zeros_like(dirs)
    best_normal[..., 2] = 1.0
    grid = (-1, rig.IMG_H, rig.IMG_W)
    dirs_img, t_img, id_img, normal_img = dirs.view(*grid, 3), best_t.view(grid), best_id.view(grid), best_normal.view(*grid, 3)
    rots, halves = _box_rotations(boxes).to(dev), (boxes[:, [4, 3, 5]] / 2).to(dev)   # length, width, height along box axes
    centres = boxes[:, :3].to(dev)
    for c, rects in enumerate(pixel_rects(cam2world, intrins, boxes)):
        o_l = rots @ (cam2world[c, :3, 3] - centres)[..., None]           # [K, 3, 1]: the camera in each box's frame
        for k, v0, v1, u0, u1 in rects:
            d_l = dirs_img[c, v0:v1, u0:u1] @ rots[k].T
            d_l = torch.where(d_l.abs() < 1e-9, torch.full_like(d_l, 1e-9), d_l)
            t1, t2 = (-halves[k] - o_l[k, :, 0]) / d_l, (halves[k] - o_l[k, :, 0]) / d_l
            t_near, axis = torch.minimum(t1, t2).max(-1)
            t_far = torch.maximum(t1, t2).min(-1).values
            hit = (t_near <= t_far) & (t_near > 0) & (t_near < t_img[c, v0:v1, u0:u1])
            normal = (-torch.nn.functional.one_hot(axis, 3).float() * d_l.sign()) @ rots[k]
            t_img[c, v0:v1, u0:u1] = torch.where(hit, t_near, t_img[c, v0:v1, u0:u1])
            id_img[c, v0:v1, u0:u1] = torch.where(hit, k, id_img[c, v0:v1, u0:u1])
            normal_img[c, v0:v1, u0:u1] = torch.where(hit[..., None], normal, normal_img[c, v0:v1, u0:u1])
    point = origin + best_t[..., None] * dirs
    shade = 0.45 + 0.55 * (best_normal @ sun.to(dev)).clamp(min=0)
    tex = 0.06 * torch.sin(0.9 * point[..., 0]) * torch.sin(1.1 * point[..., 1]) + 0.25 * (torch.remainder(point[..., 1], 7.0) < 0.15)
    ground_col = (ground.to(dev)[0] + tex)[..., None] * torch.tensor([1.0, 1.0, 0.95], device=dev)
    if layout is not None:
        drivable, dash = dense_targets.road_paint(point[..., :2], layout.to(dev))
        asphalt = (0.55 * ground.to(dev)[0] + 0.5 * tex + 0.6 * dash)[..., None].expand_as(ground_col)
        terrain = ground_col * torch.tensor([0.8, 1.0, 0.65], device=dev)
        ground_col = torch.where(drivable[..., None], asphalt, terrain)
    obj_col = colours.to(dev)[best_id.clamp(min=0)] * (1 + 0.05 * torch.sin(3 * point[..., 2:3]))
    colour = torch.where((best_id >= 0)[..., None], obj_col, ground_col) * shade[..., None]
    sky = torch.tensor([0.55, 0.7, 0.95], device=dev) * (1 - 0.3 * dirs[..., 2:3].clamp(0, 1))
    is_sky = best_t >= 1e4
    fog = 1 - torch.exp(-best_t / (60.0 + 20 * ground.to(dev)[1]))[..., None]
    colour = torch.where(is_sky[..., None], sky, colour * (1 - fog) + sky * fog)
    images = (colour.reshape(-1, rig.IMG_H, rig.IMG_W, 3).permute(0, 3, 1, 2) + noise.to(dev)).clamp(0, 1)
    depth = torch.where(is_sky, torch.zeros_like(best_t), best_t).reshape(-1, rig.IMG_H, rig.IMG_W)
    return images, depth, best_id.reshape(-1, rig.IMG_H, rig.IMG_W)


def heatmap(boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CenterPoint Gaussian centre heatmap [C, S, S] on the BEV grid (radius from box size, >= 2 cells)."""
    heat = torch.zeros(rig.NUM_CLASSES, rig.BEV_SIZE, rig.BEV_SIZE)
    grid = torch.arange(rig.BEV_SIZE, dtype=torch.float32)
    for box, cls in zip(boxes.tolist(), labels.tolist()):
        cx, cy = int((box[0] + rig.RANGE) / rig.BEV_CELL), int((box[1] + rig.RANGE) / rig.BEV_CELL)
        radius = max(2, math.ceil(0.5 * math.hypot(box[3], box[4]) / rig.BEV_CELL))
        sigma = (2 * radius + 1) / 6
        gauss = torch.exp(-((grid[None, :] - cx) ** 2 + (grid[:, None] - cy) ** 2) / (2 * sigma**2))
        heat[cls] = torch.maximum(heat[cls], gauss * (gauss > math.exp(-(radius**2) / (2 * sigma**2)) - 1e-6))
    return heat


def make_sample(seed: int, device: str | torch.device = "cpu", frames: int = 2, dense: bool = False) -> dict[str, torch.Tensor]:
    """One training sample (inputs and targets) drawn from ``seed``; see the module docstring.

    ``imgs`` is [frames, 6, 3, H, W]: the current frame, then the previous one unless ``frames=1``
    (for single-frame models; everything else, the current frame included, is the same).
    ``dense=True`` paints the seed's road layout into the images and adds the dense targets of
    ``dense_targets``: ``bev_map`` [S, S], ``occupancy`` [Z, S, S] (uint8), ``occ_mask`` [Z, S, S]
    (bool) and ``layout`` [MAX_RECTS, 5] (padded with empty rectangles). The scene, the boxes
    and the other targets are those of ``dense=False``, whose samples the layout leaves unchanged."""
    if frames not in (1, 2):
        raise ValueError(f"make_sample(frames={frames!r}): a sample has 1 (current) or 2 (current, previous) frames")
    gen = torch.Generator().manual_seed(seed)
    scene = sample_scene(gen)
    intrins = rig.intrinsics()
    c2e = rig.cam2ego(*scene["cam_jitter"])
    p2c = prev2cur(scene["ego"])
    noise = 0.03 * torch.randn(frames, rig.NUM_CAMS, 3, rig.IMG_H, rig.IMG_W, generator=gen)   # last draw; frame 0 gets the same noise for any frames
    boxes, labels = scene["boxes"], scene["labels"]
    prev_boxes = boxes.clone()
    prev_boxes[:, :2] -= boxes[:, 7:9] * rig.FRAME_DT
    args = (intrins.to(device), scene["colours"], scene["sun"], scene["ground"])
    layout = dense_targets.sample_layout(torch.Generator().manual_seed(dense_targets.layout_seed(seed))) if dense else None
    img_cur, depth, inst = render(c2e.to(device), args[0], boxes, *args[1:], noise[0], layout)
    imgs = [img_cur]
    if frames == 2:
        imgs.append(render((p2c @ c2e).to(device), args[0], prev_boxes, *args[1:], noise[1], layout)[0])
    pixels = torch.bincount(inst.flatten().clamp(min=-1) + 1, minlength=len(labels) + 1)[1:].cpu()
    inside = (boxes[:, :2].abs() < rig.RANGE).all(-1)
    keep = (labels >= 0) & inside & (pixels >= MIN_PIXELS)
    n = int(keep.sum())
    padded_boxes = torch.zeros(MAX_BOXES, 9)
    padded_labels = torch.full((MAX_BOXES,), -1, dtype=torch.long)
    padded_boxes[:n], padded_labels[:n] = boxes[keep], labels[keep]
    speed, yaw_rate = scene["ego"].tolist()
    can_bus = torch.zeros(18)
    can_bus[:4] = torch.tensor([speed, 0.0, yaw_rate, rig.FRAME_DT])
    sample = {
        "imgs": torch.stack(imgs).cpu(), "depth": depth.cpu(), "instances": inst.cpu(),
        "cam2ego": c2e, "intrins": intrins.expand(rig.NUM_CAMS, 3, 3).clone(), "lidar2img": rig.ego2img(c2e, intrins),
        "prev2cur": p2c, "can_bus": can_bus, "time_diff": torch.tensor([0.0, rig.FRAME_DT]),
        "heatmap": heatmap(boxes[keep], labels[keep]), "boxes": padded_boxes, "labels": padded_labels,
    }
    if dense:
        padded_layout = torch.zeros(MAX_RECTS, 5)
        padded_layout[:, 2:4] = -1.0                        # negative half sizes: contains no point
        padded_layout[: len(layout)] = layout
        sample.update({"bev_map": dense_targets.bev_map(boxes, labels, layout), "occupancy": dense_targets.occupancy(boxes, labels),
                       "occ_mask": dense_targets.visibility(sample["depth"], sample["lidar2img"]), "layout": padded_layout})
    return sample


class SceneDataset(torch.utils.data.Dataset):
    """``length`` samples; sample ``i`` is ``make_sample(seed + i, device, frames, dense)``."""

    def __init__(self, seed: int, length: int, device: str | torch.device = "cpu", frames: int = 2, dense: bool = False) -> None:
        self.seed, self.length, self.device, self.frames, self.dense = seed, length, device, frames, dense

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"SceneDataset index {index} out of range [0, {self.length})")
        return make_sample(self.seed + index, self.device, self.frames, self.dense)


def example_batch(batch: int = 1, seed: int = 10_000) -> dict[str, torch.Tensor]:
    """A collated batch of ``batch`` samples (seeds ``seed .. seed + batch - 1``)."""
    return torch.utils.data.default_collate([make_sample(seed + i) for i in range(batch)])
