"""A plain MLP."""
from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, inputs: int = 784, hidden: int = 128, outputs: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(inputs, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def build(seed: int = 0, **kwargs) -> MLP:
    """An MLP with seeded weights."""
    torch.manual_seed(seed)
    return MLP(**kwargs).eval()
