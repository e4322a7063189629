"""Nested capture: an untraceable forward runs eagerly and its traceable children become graphs."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import fx, nn

import ptqat_fx
from ptqat_fx.capture import AUTO_LEAVES_KEY, trace
from ptqat_fx.layer_spec import layer_specs

G = torch.Generator().manual_seed(0)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        b, c, h, w = x.shape
        return torch.relu(self.bn(self.conv(x))).view(b, c, h * w).view(b, c, h, w)


class Gated(nn.Module):
    """Untraceable root: it branches on a tensor value; its children trace."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            if x.mean() > -10:  # a value: eager only
                x = block(x)
        return self.head(x.mean((2, 3)))


X = torch.randn(2, 3, 6, 6, generator=G)


def test_untraceable_root_runs_eagerly_calling_captured_children():
    model = Gated().eval()
    gm = trace(model, example_inputs=(X,), auto_leaf=True)
    (root,) = [r for r in gm.meta[AUTO_LEAVES_KEY] if r.path == "model"]
    assert "if x.mean() > -10:" in root.line
    assert root.graphs == ["model.blocks.0", "model.blocks.1"]
    assert isinstance(gm.get_submodule("model.blocks.0"), fx.GraphModule)
    assert [n.target for n in gm.get_submodule("model.blocks.1").graph.nodes if n.op == "call_module"] == ["conv", "bn"]
    assert model.blocks[0].__class__ is Block  # the user's model is not changed
    with torch.no_grad():
        assert torch.equal(gm(X), model(X))


def test_nested_layers_are_quantized_and_calibrated():
    model = Gated().eval()
    gm = ptqat_fx.quantize(model, (X,), [X], select=None, progress=False)
    leaf = gm.meta[AUTO_LEAVES_KEY][0]
    assert sorted(leaf.quantized) == ["model.blocks.0.conv", "model.blocks.1.conv", "model.head", "model.stem"]
    assert gm.get_submodule("model.blocks.1.conv.input_quantizer").calibrated
    assert not any(True for _ in model.modules() if hasattr(_, "weight_fake_quant"))
    with torch.no_grad():
        error = (gm(X) - model(X)).norm() / model(X).norm()
    assert error < 0.2


def _fills_defaults(forward):
    """A decorator in the style of transformers' ``can_return_tuple``/``check_model_inputs``:
    it assigns into ``kwargs``."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        kwargs["scale"] = kwargs.get("scale", 2.0)
        return forward(self, *args, **kwargs)

    return wrapper


class KwargsModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    @_fills_defaults
    def forward(self, hidden, mask=None, **kwargs):
        out = self.fc(hidden) * kwargs["scale"]
        return out if mask is None else out * mask


def test_decorated_kwargs_forward_traces_whole():
    model = KwargsModel().eval()
    hidden, mask = torch.randn(2, 4, generator=G), torch.ones(2, 4)
    gm = trace(model, example_inputs=(hidden,), example_kwargs={"mask": mask}, auto_leaf=True)
    assert gm.meta[AUTO_LEAVES_KEY] == []
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["hidden", "mask"]
    assert torch.equal(gm(hidden, mask=mask), model(hidden, mask=mask))


def test_children_called_with_two_shapes_are_nested_not_specialized():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            small = nn.functional.avg_pool2d(x, 2)
            if x.sum() > 1e9:
                return x
            return self.block(x).mean() + self.block(small).mean()

    model = nn.Sequential(nn.Conv2d(3, 4, 1), Twice()).eval()
    gm = trace(model, example_inputs=(X,), auto_leaf=True)
    reasons = {r.path: r.error for r in gm.meta[AUTO_LEAVES_KEY]}
    assert reasons["1.block"].startswith("called with 2 different input shapes")
    with torch.no_grad():
        assert torch.equal(gm(X), model(X))


class KeyValueCache:
    """transformers' ``DynamicCache`` in small: an object keeping tensors that layers update."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []

    def update(self, key: torch.Tensor, index: int) -> torch.Tensor:
        if len(self.keys) <= index:
            self.keys.append(key)
        else:
            self.keys[index] = torch.cat([self.keys[index], key], dim=1)
        return self.keys[index]


class CachedBlock(nn.Module):
    """GPT2Block's call style: ``(hidden, cache, mask, encoder_states, use_cache=..., **kwargs)``."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index
        self.fc = nn.Linear(4, 4)

    def forward(self, hidden, cache=None, mask=None, encoder_states=None, use_cache=False, **kwargs):
        key = self.fc(hidden) + kwargs["position"]
        if cache is not None:
            key = key - cache.update(key, self.index).mean(dim=1, keepdim=True)  # over every cached step
        return key if mask is None else key * mask


class CachedDecoder(nn.Module):
    """GPT2Model's style: the forward makes a fresh cache and does not trace (a value branch)."""

    def __init__(self, use_cache: bool = True):
        super().__init__()
        self.use_cache = use_cache
        self.blocks = nn.ModuleList([CachedBlock(0), CachedBlock(1)])

    def forward(self, hidden):
        cache = KeyValueCache() if self.use_cache else None
        position = torch.arange(hidden.shape[1], dtype=hidden.dtype)[None, :, None]
        if hidden.abs().sum() < 0:
            return hidden
        for block in self.blocks:
            hidden = block(hidden, cache, None, None, use_cache=self.use_cache, position=position)
        return hidden


H, H2 = torch.randn(2, 3, 4, generator=G), torch.randn(2, 3, 4, generator=G)


def test_nested_child_takes_the_call_its_eager_parent_makes():
    # Non-tensor positional values before a tensor keyword: the graph has a placeholder for
    # each, so the parent's call binds as it did in the example run.
    model = CachedDecoder(use_cache=False).eval()
    gm = trace(model, example_inputs=(H,), auto_leaf=True)
    with torch.no_grad():
        assert torch.equal(gm(H2), model(H2))
    block = gm.get_submodule("model.blocks.0")
    assert isinstance(block, fx.GraphModule)
    assert [n.target for n in block.graph.nodes if n.op == "placeholder"] == [
        "hidden", "cache", "mask", "encoder_states", "use_cache", "position"]


def test_child_given_an_object_holding_tensors_is_nested_not_traced():
    # A trace would fix the cache of the example run as a constant: the next input would
    # read the example's keys.
    model = CachedDecoder().eval()
    gm = trace(model, example_inputs=(H,), auto_leaf=True)
    with torch.no_grad():
        assert torch.equal(gm(H2), model(H2))
    reasons = {r.path: r.error for r in gm.meta[AUTO_LEAVES_KEY]}
    assert reasons["model.blocks.0"].startswith("called with KeyValueCache, an object holding tensors")
    assert isinstance(gm.get_submodule("model.blocks.0.fc"), nn.Linear)
