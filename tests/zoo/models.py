"""Hand-written models, each with one idiom that torch.fx cannot trace (bev_models.md §2).

Every model is used as written: the zoo checks that ``quantize`` copes without changes. Each
keeps quantizable layers both inside the untraceable module and around it.
"""
from __future__ import annotations

import torch
from torch import nn


class ClampSTE(torch.autograd.Function):
    """A custom autograd Function: clamp with a straight-through backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp(-3, 3)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _Frame(nn.Module):
    """conv stem -> ``body`` (the idiom) -> pooled linear head."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = body
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).mean((2, 3)))


class DataDependentIf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        if x.abs().amax() > 1e3:
            x = x / x.abs().amax()
        return torch.relu(self.conv(x))


class ItemAssignment(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.out = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        y[:, 0] = 0
        y[..., 0:2] += 1.0
        return self.out(y)


class LoopOverShape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.conv(x[i : i + 1]) for i in range(x.shape[0])])


class CustomFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return ClampSTE.apply(self.conv(x))


class NoGradInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.reference = nn.Conv2d(8, 8, 1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        with torch.no_grad():
            gate = torch.sigmoid(self.reference(x))
        return self.conv(x) * gate


class NonzeroRebatch(nn.Module):
    """BEVFormer SCA style: gather the positions a mask selects, project only those."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        kept = (tokens.mean(-1) > 0).nonzero()
        if len(kept) == 0:
            return x
        out = torch.zeros_like(tokens)
        out[kept[:, 0], kept[:, 1]] = self.proj(tokens[kept[:, 0], kept[:, 1]])
        return out.transpose(1, 2).reshape(b, c, h, w)


class ZerosOfTracedSize(nn.Module):
    """``torch.zeros(x.shape[0], ...)``: a factory call with a traced size (SparseBEV)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        bias = torch.zeros(x.shape[0], 8, 1, 1)
        return self.conv(x) + bias


class ListOfDictInput(nn.Module):
    """forward(img, img_metas): iterates a list of per-sample dicts, as mmdet3d heads do."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 10)

    def forward(self, img, img_metas):
        feats = self.backbone(img).mean((2, 3))
        scales = torch.stack([meta["scale"] for meta in img_metas])
        offsets = torch.cat([meta["offset"] for meta in img_metas])
        return self.head(feats * scales + offsets)


class WithAttention(nn.Module):
    """A conv stem feeding ``nn.MultiheadAttention`` over the pixels, sequence-first."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.attention = nn.MultiheadAttention(16, 4)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        tokens = self.stem(x).flatten(2).permute(2, 0, 1)
        attended, _ = self.attention(tokens, tokens, tokens)
        return self.head((tokens + attended).mean(0))


class SharedLayer(nn.Module):
    """One conv applied at every step of a refinement loop (SparseBEV's shared layer)."""

    def __init__(self, steps: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.refine = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)
        self.steps = steps

    def forward(self, x):
        x = self.stem(x)
        for _ in range(self.steps):
            x = x + torch.relu(self.refine(x))
        return self.head(x.mean((2, 3)))


def _image(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _metas(batch: int = 4, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {"scale": torch.rand(8, generator=generator) + 0.5, "offset": torch.randn(1, 8, generator=generator), "name": f"cam{i}"}
        for i in range(batch)
    ]


IDIOMS = {
    "data_dependent_if": lambda: _Frame(DataDependentIf()),
    "item_assignment": lambda: _Frame(ItemAssignment()),
    "loop_over_shape": lambda: _Frame(LoopOverShape()),
    "custom_autograd_function": lambda: _Frame(CustomFunction()),
    "no_grad_in_forward": lambda: _Frame(NoGradInForward()),
    "nonzero_len": lambda: _Frame(NonzeroRebatch()),
    "zeros_of_traced_size": lambda: _Frame(ZerosOfTracedSize()),
    "list_of_dict_input": ListOfDictInput,
    "multihead_attention": WithAttention,
    "shared_layer": SharedLayer,
}


def build(name: str, seed: int = 0) -> nn.Module:
    """The idiom model ``name`` with seeded weights, in eval mode."""
    torch.manual_seed(seed)
    return IDIOMS[name]().eval()


def inputs(name: str, seed: int = 0) -> tuple:
    """Example inputs of the idiom model ``name``."""
    if name == "list_of_dict_input":
        return (_image(seed=seed), _metas(seed=seed))
    return (_image(seed=seed),)
