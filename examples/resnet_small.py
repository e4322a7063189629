"""The small ResNet of the examples: the one ``ptqat-fx demo`` ships in the package."""
from __future__ import annotations

from ptqat_fx.demo_models.resnet_small import BasicBlock, SmallResNet, build

__all__ = ["BasicBlock", "SmallResNet", "build"]
