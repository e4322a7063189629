"""annotate + insert_quantizers: which layers get quantizers, and how they are shared."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptqat_fx.config import QuantConfig
from ptqat_fx.layer_spec import layer_specs
from ptqat_fx.passes.annotate import annotate
from ptqat_fx.passes.insert_quantizers import insert_quantizers
from ptqat_fx.runtime.quantizer import FakeQuantizer, quantizers
from ptqat_fx.capture import trace
from examples import mlp, resnet_small, vit_small


def _prepared(model, config=None):
    return insert_quantizers(annotate(trace(model), config), config)


def test_every_layer_of_the_vit_is_quantized():
    model = vit_small.build(depth=2)
    specs = layer_specs(_prepared(model))
    kinds = [s.kind for s in specs]
    # patch conv + per block (q, k, v, 2 matmuls, proj, fc1, fc2) + head
    assert kinds.count("conv2d") == 1
    assert kinds.count("linear") == 2 * 6 + 1
    assert kinds.count("matmul") == 2 * 2
    assert [s.index for s in specs] == list(range(len(specs)))


def test_quantizer_counts_and_shared_input():
    model = vit_small.build(depth=1)
    gm = _prepared(model)
    specs = {s.name: s for s in layer_specs(gm)}
    # q, k and v read the same normalised tensor: one shared input quantizer.
    assert specs["blocks.0.attn.q"].input_quantizers == specs["blocks.0.attn.k"].input_quantizers
    assert specs["blocks.0.attn.q"].input_quantizers == specs["blocks.0.attn.v"].input_quantizers
    weight_quantizers = {n for n, q in quantizers(gm).items() if q.channel_axis is not None}
    assert weight_quantizers == {s.weight_quantizer for s in specs.values() if s.weight}
    assert all(len(s.input_quantizers) == 2 for s in specs.values() if s.kind == "matmul")


def test_quantized_graph_in_observe_mode_equals_the_float_model():
    model = resnet_small.build()
    gm = _prepared(resnet_small.build())
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(gm(x), model(x), rtol=1e-5, atol=1e-6)


def test_skip_by_glob_and_by_kind():
    model = mlp.build()
    assert [s.name for s in layer_specs(_prepared(model, QuantConfig(skip=("fc3",))))] == ["fc1", "fc2"]
    specs = layer_specs(_prepared(vit_small.build(), QuantConfig(skip=("matmul", "blocks.*"))))
    assert [s.name for s in specs] == ["patch_embed", "head"]


def test_first_and_last_layer_bits():
    gm = _prepared(mlp.build(), QuantConfig(w_bits=4, a_bits=8, first_layer_bits=8, last_layer_bits=6))
    assert [(s.w_bits, s.a_bits) for s in layer_specs(gm)] == [(8, 8), (4, 8), (6, 6)]
    assert gm.get_submodule("fc3.weight_fake_quant").bits == 6


def test_unsigned_after_relu_when_asked():
    gm = _prepared(mlp.build(), QuantConfig(unsigned_activations=True))
    assert gm.get_submodule("input_quantizers.relu").signed is False
    assert gm.get_submodule("input_quantizers.flatten").signed is True


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))
        self.conv = nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")
        self.up = nn.ConvTranspose2d(3, 2, 2, stride=2)

    def forward(self, x):
        y = self.up(self.conv(x))
        return F.linear(y.mean((2, 3)).repeat(1, 2)[:, :3], self.w)


def test_functional_reflect_padding_and_transposed_conv():
    model = Functional().eval()
    gm = _prepared(Functional().eval())
    gm.load_state_dict(model.state_dict(), strict=False)
    specs = layer_specs(gm)
    assert [s.kind for s in specs] == ["conv2d", "conv_transpose2d", "linear"]
    assert gm.get_submodule("up.weight_fake_quant").channel_axis == 1
    assert isinstance(gm.get_submodule("w_fake_quant"), FakeQuantizer)
    x = torch.randn(1, 3, 6, 6)
    assert torch.allclose(gm(x), model(x), atol=1e-6)


def test_module_called_twice_shares_its_weight_quantizer():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))

    specs = layer_specs(_prepared(Twice()))
    assert [s.name for s in specs] == ["fc", "fc#1"]
    assert specs[0].weight_quantizer == specs[1].weight_quantizer


def test_geometry_matmuls_stay_in_float():
    class Projection(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, points, camera):
            rays = camera @ points  # inputs only: geometry
            moved = self.fc(rays.transpose(1, 2))
            projected = moved @ camera  # a feature times a camera matrix: still geometry
            return moved @ moved.transpose(1, 2) + projected.sum()  # two features: quantized

    specs = layer_specs(_prepared(Projection()))
    assert [s.kind for s in specs] == ["linear", "matmul"]


def test_quantizers_are_made_on_the_models_device():
    # The meta device stands in for a GPU: a quantizer made elsewhere would show up on the CPU.
    gm = trace(vit_small.build(depth=1)).to("meta")
    gm = insert_quantizers(annotate(gm))
    devices = {q.scale.device.type for q in quantizers(gm).values()}
    assert devices == {"meta"} and len(quantizers(gm)) > 2
