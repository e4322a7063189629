"""The shared six-camera rig and BEV grid every stand-in model and the scene set agree on.

Frames: ego x forward, y left, z up, origin on the ground under the vehicle centre; cameras use
the OpenCV convention (x right, y down, z forward). BEV maps are indexed ``[row = y, col = x]``.
"""
from __future__ import annotations

import math

import torch

CLASSES = ("car", "pedestrian", "cone")
NUM_CLASSES = len(CLASSES)

NUM_CAMS = 6
CAM_YAWS_DEG = (55.0, 0.0, -55.0, 110.0, 180.0, -110.0)
HFOV_DEG = 70.0
CAM_HEIGHT = 1.6
IMG_H, IMG_W = 128, 352

RANGE = 40.0                      # perception range: x, y in [-RANGE, RANGE] m
Z_RANGE = (-3.0, 5.0)
BEV_SIZE = 64                     # dense heads predict on a 64 x 64 grid
BEV_CELL = 2 * RANGE / BEV_SIZE   # 1.25 m
FRAME_DT = 0.5                    # seconds between the previous and the current frame


def intrinsics() -> torch.Tensor:
    """Pinhole intrinsics [3, 3] shared by all cameras (square pixels, centred principal point)."""
    f = (IMG_W / 2) / math.tan(math.radians(HFOV_DEG) / 2)
    return torch.tensor([[f, 0.0, IMG_W / 2], [0.0, f, IMG_H / 2], [0.0, 0.0, 1.0]])


def cam2ego(yaw_jitter: torch.Tensor | None = None, pitch_jitter: torch.Tensor | None = None) -> torch.Tensor:
    """Camera-to-ego transforms [6, 4, 4]; optional per-camera jitter (radians) mimics calibration spread."""
    yaw = torch.tensor(CAM_YAWS_DEG).deg2rad()
    pitch = torch.zeros(NUM_CAMS)
    if yaw_jitter is not None:
        yaw = yaw + yaw_jitter
    if pitch_jitter is not None:
        pitch = pitch + pitch_jitter
    cy, sy, cp, sp = yaw.cos(), yaw.sin(), pitch.cos(), pitch.sin()
    # Forward points along yaw and tilts down by pitch; right stays horizontal; down completes the frame.
    forward = torch.stack([cy * cp, sy * cp, -sp], -1)
    right = torch.stack([sy, -cy, torch.zeros_like(cy)], -1)
    down = torch.cross(forward, right, dim=-1)
    mat = torch.eye(4).repeat(NUM_CAMS, 1, 1)
    mat[:, :3, 0], mat[:, :3, 1], mat[:, :3, 2] = right, down, forward
    mat[:, 0, 3], mat[:, 1, 3], mat[:, 2, 3] = 1.0 * cy, 0.8 * sy, CAM_HEIGHT
    return mat


def ego2img(cam2ego_mat: torch.Tensor, intrins: torch.Tensor) -> torch.Tensor:
    """``lidar2img`` [..., 4, 4]: ego point (homogeneous) -> (u * d, v * d, d, 1)."""
    k4 = torch.zeros(*intrins.shape[:-2], 4, 4, dtype=intrins.dtype)
    k4[..., :3, :3] = intrins
    k4[..., 3, 3] = 1.0
    return k4 @ torch.linalg.inv(cam2ego_mat)


def rigid_inverse(mat: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid transforms [..., 4, 4] as plain tensor maths (traceable, no linalg)."""
    rot_t = mat[..., :3, :3].transpose(-1, -2)
    trans = -(rot_t @ mat[..., :3, 3:])
    bottom = mat[..., 3:, :]
    return torch.cat([torch.cat([rot_t, trans], -1), bottom], -2)
