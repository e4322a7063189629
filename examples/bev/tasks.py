"""The dense tasks as model variants and as one plug-in interface for experiment harnesses.

Variants (each a subclass of its detection stand-in with the detection head replaced, so the
trunk, view transform and BEV encoder keep the detection checkpoint's parameter names):

- ``build_bevdet_seg()``: TinyBEVDet's BEV features -> ``SegHead`` -> ``{"seg": [B, 5, 64, 64]}``.
- ``build_bevformer_seg()``: TinyBEVFormer's 32 x 32 encoder output (no object decoder) ->
  ``SegHead`` with x2 upsampling -> ``{"seg": [B, 5, 64, 64]}``.
- ``build_bevdepth4d_occ()``: TinyBEVDepth4D's BEV features -> ``OccHead`` ->
  ``{"occ": [B, 5, 8, 64, 64], "depth": ...}`` (depth kept for BEVDepth's depth loss).

``task(name)`` returns a ``Task``: ``build_model()`` (the FP model, with the task checkpoint),
``make_train_batches(seed, count, batch)`` (tuples ``(*model inputs, *targets)`` for
``ptqat_fx.quantize`` calibration and ``ptqat_fx.finetune``), ``loss_fn(outputs, batch)`` (the
task loss on such a tuple) and ``evaluate(model)`` -> ``{"mIoU", "iou_<class>"...}`` on the
held-out scenes (rendered once, on first use).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import torch
from torch import nn

from examples.bev import bevdepth4d, bevdet, bevformer, scenes
from examples.bev.dense_heads import OccHead, SegHead, dense_loss
from examples.bev.dense_targets import MAP_CLASSES, OCC_CLASSES, OCC_LAYERS
from examples.bev.seg_metric import ConfusionMatrix

VAL_SEED = 1_000_000        # the detection models' held-out seeds (train.VAL_SEED)
TASKS = ("bevdet_seg", "bevformer_seg", "bevdepth4d_occ")


def seg_losses(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"seg": dense_loss(outputs["seg"], batch["bev_map"])}


def occ_losses(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"occ": dense_loss(outputs["occ"], batch["occupancy"], batch["occ_mask"]),
            "depth": bevdepth4d.DEPTH_LOSS_WEIGHT * bevdepth4d.depth_loss(outputs["depth"], batch["depth"])}


class TinyBEVDetSeg(bevdet.TinyBEVDet):
    """forward(imgs [B, 6, 3, H, W], cam2ego, intrins) -> {"seg": logits [B, 5, S, S]}."""

    def __init__(self) -> None:
        super().__init__()
        del self.head
        self.seg_head = SegHead(64, len(MAP_CLASSES))

    def forward(self, imgs: torch.Tensor, cam2ego: torch.Tensor, intrins: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"seg": self.seg_head(self.bev_features(imgs, cam2ego, intrins))}

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return seg_losses(outputs, batch)


class TinyBEVFormerSeg(bevformer.TinyBEVFormer):
    """forward(imgs [B, 2, 6, 3, H, W], lidar2img, can_bus, prev2cur) -> {"seg": logits [B, 5, S, S]}."""

    def __init__(self) -> None:
        super().__init__()
        del self.query_embedding, self.reference_points, self.decoder
        self.seg_head = SegHead(bevformer.DIM, len(MAP_CLASSES), upsample=2)

    def forward(self, imgs: torch.Tensor, lidar2img: torch.Tensor, can_bus: torch.Tensor, prev2cur: torch.Tensor) -> dict[str, torch.Tensor]:
        bev = self.bev_features(imgs, lidar2img, can_bus, prev2cur)
        return {"seg": self.seg_head(bev.transpose(1, 2).unflatten(2, (bevformer.BEV, bevformer.BEV)))}

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return seg_losses(outputs, batch)


class TinyBEVDepth4DOcc(bevdepth4d.TinyBEVDepth4D):
    """forward(imgs [B, 2, 6, 3, H, W], cam2ego, intrins, prev2cur) -> {"occ": [B, 5, Z, S, S], "depth"}."""

    def __init__(self) -> None:
        super().__init__()
        del self.head
        self.occ_head = OccHead(64, len(OCC_CLASSES), OCC_LAYERS)

    def forward(self, imgs: torch.Tensor, cam2ego: torch.Tensor, intrins: torch.Tensor, prev2cur: torch.Tensor) -> dict[str, torch.Tensor]:
        bev, depth = self.bev_features(imgs, cam2ego, intrins, prev2cur)
        return {"occ": self.occ_head(bev), "depth": depth}

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return occ_losses(outputs, batch)


def build_bevdet_seg() -> TinyBEVDetSeg:
    return TinyBEVDetSeg()


def build_bevformer_seg() -> TinyBEVFormerSeg:
    return TinyBEVFormerSeg()


def build_bevdepth4d_occ() -> TinyBEVDepth4DOcc:
    return TinyBEVDepth4DOcc()


@dataclass(frozen=True)
class TaskSpec:
    """What a task reads from a scene batch and how it is scored."""

    build: Callable[[], nn.Module]
    losses: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    module: ModuleType          # the detection stand-in's module: ``inputs(batch)``
    trunk_checkpoint: str       # detection checkpoint whose matching parameters initialise FP training
    frames: int
    targets: tuple[str, ...]    # batch keys the loss reads, after the model inputs
    output: str
    classes: tuple[str, ...]
    mask: str | None = None


SPECS = {
    "bevdet_seg": TaskSpec(build_bevdet_seg, seg_losses, bevdet, "examples/checkpoints/bevdet.pt", 1, ("bev_map",), "seg", MAP_CLASSES),
    "bevformer_seg": TaskSpec(build_bevformer_seg, seg_losses, bevformer, "examples/checkpoints/bevformer.pt", 2, ("bev_map",), "seg", MAP_CLASSES),
    "bevdepth4d_occ": TaskSpec(build_bevdepth4d_occ, occ_losses, bevdepth4d, "examples/checkpoints/bevdepth4d.pt", 2,
                               ("occupancy", "occ_mask", "depth"), "occ", OCC_CLASSES, mask="occ_mask"),
}


def spec(name: str) -> TaskSpec:
    if name not in SPECS:
        raise ValueError(f"unknown task {name!r}; choose one of {TASKS}")
    return SPECS[name]


def load_matching(model: nn.Module, checkpoint: str) -> list[str]:
    """Copy the parameters of a saved fp16 state_dict whose names and shapes match ``model``'s; returns their names."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    own = model.state_dict()
    matched = {k: v.float() if v.is_floating_point() else v for k, v in saved.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    return sorted(matched)


def render_batches(name: str, seed: int, count: int, batch: int, device: str | torch.device = "cpu") -> list[dict[str, torch.Tensor]]:
    """Collated dense scene batches ``seed .. seed + count - 1`` for task ``name``, on ``device``."""
    frames = spec(name).frames
    out = []
    for first in range(seed, seed + count, batch):
        samples = [scenes.make_sample(s, device, frames, dense=True) for s in range(first, min(first + batch, seed + count))]
        out.append({k: v.to(device) for k, v in torch.utils.data.default_collate(samples).items()})
    return out


def as_tuple(name: str, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``(*model inputs, *targets)`` of a collated batch: the form ``quantize`` and ``finetune`` take."""
    return (*spec(name).module.inputs(batch), *(batch[key] for key in spec(name).targets))


def task_loss(name: str, outputs: dict[str, torch.Tensor], batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The variant's training loss on an ``as_tuple`` batch (targets after the model inputs)."""
    keys = spec(name).targets
    return sum(spec(name).losses(outputs, dict(zip(keys, batch[len(batch) - len(keys):]))).values())


@torch.no_grad()
def evaluate(name: str, model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Per-class IoU and mIoU (the empty class left out; occupancy inside the visibility mask)."""
    task = spec(name)
    matrix = ConfusionMatrix(task.classes, mean_over=task.classes[1:])
    model.eval()
    for batch in batches:
        prediction = model(*task.module.inputs(batch))[task.output].argmax(1)
        label = batch[task.targets[0]]
        matrix.update(prediction, label, batch[task.mask] if task.mask else None)
    return matrix.result()


@dataclass
class Task:
    """One dense task for a harness: four callables (see the module docstring)."""

    name: str
    checkpoint: str
    device: str | torch.device = "cpu"
    val_samples: int = 200
    batch: int = 8
    _val: list[dict[str, torch.Tensor]] | None = field(default=None, repr=False)

    def build_model(self) -> nn.Module:
        model = spec(self.name).build()
        state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        return model.to(self.device).eval()

    def make_train_batches(self, seed: int, count: int, batch: int) -> list[tuple[torch.Tensor, ...]]:
        return [as_tuple(self.name, b) for b in render_batches(self.name, seed, count, batch, self.device)]

    def loss_fn(self, outputs: dict[str, torch.Tensor], batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return task_loss(self.name, outputs, batch)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if self._val is None:
            self._val = render_batches(self.name, VAL_SEED, self.val_samples, self.batch, self.device)
        return evaluate(self.name, model, self._val)


def task(name: str, checkpoint: str | None = None, device: str | torch.device = "cpu", val_samples: int = 200) -> Task:
    """The harness interface of task ``name`` (checkpoint: ``examples/checkpoints/<name>.pt`` by default)."""
    spec(name)
    return Task(name, checkpoint or f"examples/checkpoints/{name}.pt", device, val_samples)
