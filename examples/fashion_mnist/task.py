"""Fashion-MNIST as an experiment ``Task``: a trained FP model, seeded training batches, test accuracy."""
from __future__ import annotations

import numpy as np
import torch

from examples.experiment import Task
from examples.fashion_mnist import data, models


def make_task(model: str, checkpoint: str, *, device: str | torch.device = "cpu", batch: int = 128,
              train_images: int | None = None, test_images: int | None = None,
              arrays: dict[str, np.ndarray] | None = None) -> Task:
    """The ``fmnist-<model>`` task: the checkpoint's FP model, batches of ``batch`` training images
    (no augmentation) in an order drawn from the seed, and accuracy (%) on the first
    ``test_images`` test images (all 10,000 by default)."""
    arrays = arrays if arrays is not None else data.load()
    device = torch.device(device)
    images = models.normalise(torch.from_numpy(arrays["train_images"][:train_images])).to(device)
    labels = torch.from_numpy(arrays["train_labels"][:train_images]).long().to(device)
    test_x = torch.from_numpy(arrays["test_images"][:test_images]).to(device)
    test_y = torch.from_numpy(arrays["test_labels"][:test_images]).long().to(device)
    models.load(model, checkpoint)  # fail here, not in the first cell, on a wrong checkpoint

    def build_model() -> torch.nn.Module:
        return models.load(model, checkpoint)[0].to(device)

    def make_train_batches(seed: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(seed)
        needed = count * batch
        order = torch.cat([torch.randperm(len(labels), generator=generator) for _ in range(-(-needed // len(labels)))])
        order = order[:needed].to(device)
        return [(images[index], labels[index]) for index in order.split(batch)]

    def evaluate(qmodel: torch.nn.Module) -> dict[str, float]:
        return {"accuracy": models.accuracy(qmodel, test_x, test_y)}

    def loss_fn(outputs: torch.Tensor, batch_: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(outputs, batch_[1])

    return Task(f"fmnist-{model}", build_model, make_train_batches, evaluate, loss_fn, metric="accuracy")
