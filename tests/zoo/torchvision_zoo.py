"""torchvision classification models for the zoo, where torchvision is importable.

torchvision wheels are built against one torch release; with another, its C++ extension
does not load, which is harmless for classification models, but its import then fails while
registering fake kernels for ``torchvision::nms``/``qnms``, ops the extension would have
defined. ``load_torchvision`` defines those two schemas, gives ``nms`` a CPU kernel in plain
PyTorch (detection models call it in eval; ``roi_align`` has torchvision's own Python
fallback), imports again, and lets ``torchvision.ops.nms`` (which ``batched_nms`` and so the
detection heads call) reach that kernel: it refuses to run without the extension.
"""
from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Callable

import torch
from torch import nn

_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_library: list[torch.library.Library] = []


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression, torchvision's semantics: indices of the kept boxes by
    decreasing score."""
    order = scores.argsort(descending=True)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    for index in order.tolist():
        if suppressed[index]:
            continue
        keep.append(index)
        top_left = torch.maximum(boxes[index, :2], boxes[:, :2])
        bottom_right = torch.minimum(boxes[index, 2:], boxes[:, 2:])
        inter = (bottom_right - top_left).clamp(min=0).prod(1)
        suppressed |= inter / (area[index] + area - inter) > iou_threshold
    return torch.tensor(keep, dtype=torch.int64)


def load_torchvision() -> ModuleType | None:
    """``torchvision``, or None where it is not installed."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
    for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
        del sys.modules[name]
    if not _library:
        _library.append(torch.library.Library("torchvision", "FRAGMENT"))
        for schema in _SCHEMAS:
            _library[0].define(schema)
        _library[0].impl("nms", _nms, "CPU")
    torchvision = importlib.import_module("torchvision")
    torchvision.ops.nms = torchvision.ops.boxes.nms = _registered_nms
    return torchvision


def _registered_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """``torchvision.ops.nms`` without its check that the C++ extension loaded."""
    return torch.ops.torchvision.nms(boxes, scores, iou_threshold)


def randomize_zero_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give weights that start at zero (ViT's head) small random values, so outputs and their
    quantization errors are not trivially zero; returns ``model``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("weight") and parameter.dim() > 1 and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model


def builders(torchvision: ModuleType) -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    """name -> (builder, input shape): one model per family; the heavy families in reduced
    configurations of the same classes (same code paths, fewer and narrower blocks)."""
    models = torchvision.models
    return {
        "resnet18": (models.resnet18, (2, 3, 64, 64)),
        "mobilenet_v3_small": (models.mobilenet_v3_small, (2, 3, 64, 64)),
        "efficientnet_b0": (models.efficientnet_b0, (2, 3, 64, 64)),
        "regnet_x_400mf": (models.regnet_x_400mf, (2, 3, 64, 64)),
        "convnext(small config)": (
            lambda: models.ConvNeXt([models.convnext.CNBlockConfig(24, 48, 2), models.convnext.CNBlockConfig(48, None, 2)]),
            (2, 3, 64, 64),
        ),
        "vit(small config)": (
            lambda: models.VisionTransformer(64, 16, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128),
            (2, 3, 64, 64),
        ),
        "swin(small config)": (
            lambda: models.SwinTransformer([4, 4], 32, [2, 2], [2, 4], [4, 4]),
            (2, 3, 64, 64),
        ),
        "densenet(small config)": (
            lambda: models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16),
            (2, 3, 64, 64),
        ),
    }
