"""The two Fashion-MNIST FP models (a ResNet-style CNN and a small ViT), their training recipe
and their checkpoints.

    python -m examples.fashion_mnist.models --model resnet --out examples/checkpoints/fmnist_resnet.pt

One recipe per model, fixed here and stated in docs/results.md: random 2-pixel shifts and
horizontal flips, cosine learning rate with a short warmup, label smoothing 0.1; data held on
the device as uint8 and normalised per batch.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from examples.fashion_mnist import data as fmnist_data
from examples.resnet_small import SmallResNet
from examples.vit_small import SmallViT

MEAN, STD = 0.2860, 0.3530  # of the Fashion-MNIST training images


@dataclass(frozen=True)
class Recipe:
    """How one model is built and trained in floating point."""

    kwargs: dict
    epochs: int
    batch: int
    lr: float
    weight_decay: float
    optimizer: str  # "sgd" (momentum 0.9, nesterov) or "adamw"


RECIPES = {
    "resnet": Recipe({"in_channels": 1, "width": 32, "blocks": 2}, epochs=15, batch=256, lr=0.1, weight_decay=5e-4, optimizer="sgd"),
    "vit": Recipe({"image": 28, "patch": 4, "dim": 96, "depth": 4, "heads": 4}, epochs=30, batch=256, lr=2e-3, weight_decay=0.05, optimizer="adamw"),
}


def build(name: str) -> nn.Module:
    """A freshly initialised model ``name`` (``resnet`` or ``vit``)."""
    if name not in RECIPES:
        raise ValueError(f"unknown Fashion-MNIST model {name!r}; choose one of {tuple(RECIPES)}")
    return (SmallResNet if name == "resnet" else SmallViT)(**RECIPES[name].kwargs)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 1, 28, 28], standardised."""
    return ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels (zero padding) and horizontal flips, per image."""
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2), value=-MEAN / STD)
    dy, dx = (torch.randint(0, 5, (2, n), generator=generator)).to(x.device)
    rows = (dy[:, None] + torch.arange(28, device=x.device))[:, None, :, None].expand(n, 1, 28, 32)
    shifted = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(28, device=x.device))[:, None, None, :].expand(n, 1, 28, 28)
    shifted = shifted.gather(3, cols)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], shifted.flip(3), shifted)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy in percent of ``model`` (in eval mode) on uint8 ``images``."""
    was_training = model.training
    model.eval()
    correct = 0
    for first in range(0, len(labels), batch):
        logits = model(normalise(images[first: first + batch]))
        correct += int((logits.argmax(1) == labels[first: first + batch]).sum())
    model.train(was_training)
    return 100.0 * correct / len(labels)


def train(name: str, arrays: dict[str, np.ndarray], device: torch.device, *, epochs: int | None = None,
          train_limit: int | None = None, test_limit: int | None = None, seed: int = 0,
          log: bool = True) -> tuple[nn.Module, dict]:
    """Train model ``name`` by its recipe; returns the model (eval mode) and a report with its test accuracy."""
    recipe = RECIPES[name]
    epochs = epochs or recipe.epochs
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images = torch.from_numpy(arrays["train_images"][:train_limit]).to(device)
    labels = torch.from_numpy(arrays["train_labels"][:train_limit]).long().to(device)
    test_images = torch.from_numpy(arrays["test_images"][:test_limit]).to(device)
    test_labels = torch.from_numpy(arrays["test_labels"][:test_limit]).long().to(device)
    model = build(name).to(device).train()
    if recipe.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9, nesterov=True, weight_decay=recipe.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    per_epoch = max(1, len(labels) // recipe.batch)
    total, warmup = epochs * per_epoch, per_epoch // 2 + 1
    start, step = time.perf_counter(), 0
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=generator).to(device)
        for i in range(per_epoch):
            for group in opt.param_groups:
                group["lr"] = recipe.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))
            index = order[i * recipe.batch: (i + 1) * recipe.batch]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(augment(normalise(images[index]), generator))
            loss = F.cross_entropy(logits.float(), labels[index], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if log:
            print(f"{name} epoch {epoch + 1}/{epochs} loss {loss.item():.3f} {time.perf_counter() - start:.0f} s", flush=True)
    model.eval()
    report = {
        "model": name, "recipe": {**vars(recipe), "epochs": epochs}, "steps": step, "train_images": len(labels), "test_images": len(test_labels),
        "train_seconds": round(time.perf_counter() - start, 1), "test_accuracy": accuracy(model, test_images, test_labels),
        "params": sum(p.numel() for p in model.parameters()), "device": str(device), "torch": str(torch.__version__),
    }
    return model, report


def save(model: nn.Module, report: dict, path: str) -> None:
    torch.save({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "report": report}, path)


def load(name: str, path: str) -> tuple[nn.Module, dict]:
    """Model ``name`` with the float weights of checkpoint ``path`` (eval mode, CPU) and its training report."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = build(name)
    model.load_state_dict(state["state_dict"])
    return model.eval(), state["report"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=tuple(RECIPES), required=True)
    parser.add_argument("--out", required=True, help="checkpoint path")
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--train-limit", type=int, default=None, help="train on the first N images only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    model, report = train(args.model, fmnist_data.load(), torch.device(args.device), epochs=args.epochs, train_limit=args.train_limit)
    save(model, report, args.out)
    print(report)


if __name__ == "__main__":
    main()
