"""freeze: the trainable set, unchanged outputs, and what frozen layers keep for backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ptqat_fx
from ptqat_fx import ConfigError, QuantConfig, Select
from ptqat_fx.runtime.frozen_conv import frozen_conv
from ptqat_fx.layer_spec import layer_specs
from ptqat_fx.meta import is_frozen, layer_spec
from ptqat_fx.saved_tensors import saved_tensor_bytes
from ptqat_fx.passes.freeze import freeze
from ptqat_fx.passes.select import select_layers
from examples import mlp, resnet_small, vit_small

EXAMPLES = {"resnet": (resnet_small.build, (4, 3, 32, 32)), "vit": (vit_small.build, (4, 1, 28, 28))}
# Min-max observers: calibration in a fraction of the MSE search's time; what these tests check
# (outputs before and after the rewrite, bytes kept for backward) does not depend on the scales.
FAST = QuantConfig(w_observer="minmax", a_observer="minmax")
# The ResNet variant of the heaviest tests runs with -m slow (in CI); the ViT one by default.
HEAVY_RESNET = [pytest.param("resnet", marks=pytest.mark.slow), "vit"]


def _data(shape):
    return [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in range(2)]


def test_trainable_set_of_a_hand_picked_selection_is_written_out():
    data = _data((4, 1, 28, 28))
    gm = ptqat_fx.quantize(mlp.build(), (data[0],), data, select=None, progress=False)
    for spec in layer_specs(gm):
        spec.selected = spec.name == "fc2"
    freeze(gm)
    # fc2's weight, bias, weight step and the step of its input quantizer (on relu's output).
    expected = {"fc2.weight", "fc2.bias", "fc2.weight_fake_quant.scale", "input_quantizers.relu.scale"}
    assert {n for n, p in gm.named_parameters() if p.requires_grad} == expected


@pytest.mark.parametrize("name", EXAMPLES)
def test_trainable_set_is_exactly_the_selected_layers(name):
    build, shape = EXAMPLES[name]
    data = _data(shape)
    gm = ptqat_fx.quantize(build(), (data[0],), data, select=Select("small", fraction=0.5), progress=False)
    specs = layer_specs(gm)
    assert sum(s.selected for s in specs) == len(specs) // 2
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    # The exact set is written out for the MLP above; here: selected weights train, no
    # other weight does, and (below) gradients reach exactly the trainable set.
    weights = {s.weight: s.selected for s in specs if s.weight}
    assert {w for w, chosen in weights.items() if chosen} == {w for w in weights if w in trainable}

    gm.train()
    gm(data[0]).square().sum().backward()
    for parameter_name, parameter in gm.named_parameters():
        if parameter_name in trainable:
            assert parameter.grad is not None, parameter_name
        else:
            assert parameter.grad is None, parameter_name


@pytest.mark.parametrize("name", HEAVY_RESNET)
def test_rewritten_model_outputs_equal_the_unrewritten_fake_quant_model(name):
    build, shape = EXAMPLES[name]
    data = _data(shape)
    unrewritten = ptqat_fx.quantize(build(), (data[0],), data, FAST, select=None, progress=False)
    for strategy in ("small", "all", "none"):
        rewritten = ptqat_fx.quantize(build(), (data[0],), data, FAST, select=Select(strategy), progress=False)
        for x in data:
            assert torch.allclose(rewritten(x), unrewritten(x), rtol=1e-5, atol=1e-6), strategy


def test_all_is_full_qat_and_none_trains_no_layer():
    build, shape = EXAMPLES["resnet"]
    data = _data(shape)
    full = ptqat_fx.quantize(build(), (data[0],), data, select=Select("all"), progress=False)
    layer_params = {n for s in layer_specs(full) for n in (s.weight, s.bias) if n}
    trainable = {n for n, p in full.named_parameters() if p.requires_grad}
    assert layer_params <= trainable
    assert all(full.get_submodule(q).scale.requires_grad for q in {q for s in layer_specs(full) for q in s.input_quantizers})

    ptq = ptqat_fx.quantize(build(), (data[0],), data, select=Select("none"), progress=False)
    assert not any(p.requires_grad for p in ptq.parameters())
    assert "weight_fake_quant(" not in ptq.code  # every weight a constant


def test_frozen_layers_use_constants_and_frozen_conv():
    build, shape = EXAMPLES["resnet"]
    data = _data(shape)
    gm = ptqat_fx.quantize(build(), (data[0],), data, select=Select("small"), progress=False)
    frozen = [node for node in gm.graph.nodes if is_frozen(node)]
    # resnet_small has 10 layers (9 convs, fc); fraction 0.5 trains 5, so 5 are frozen.
    assert len(frozen) == 5
    for node in frozen:
        assert node.target in (frozen_conv, F.linear)
        assert node.args[1].op == "get_attr" and node.args[1].target.endswith("frozen_weight")

        # The constant is what the layer's weight quantizer computed before the rewrite.
        spec = layer_spec(node)
        quantizer = gm.get_submodule(spec.weight_quantizer)
        with torch.no_grad():
            expected = quantizer(gm.get_parameter(spec.weight))
        assert torch.equal(gm.get_buffer(node.args[1].target), expected), spec.name


def test_frozen_conv_keeps_only_the_weight():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, 3)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = frozen_conv(x, w, None, 1, 1)
    assert saved == [w.shape]
    grad = torch.randn_like(out)
    out.backward(grad)
    reference = x.detach().clone().requires_grad_()
    F.conv2d(reference, w, None, 1, 1).backward(grad)
    assert torch.allclose(x.grad, reference.grad, atol=1e-5)


def test_freeze_without_selection_is_a_clear_error():
    data = _data((2, 784))
    gm = ptqat_fx.quantize(mlp.build(), (data[0],), data, select=None, progress=False)
    with pytest.raises(ConfigError, match="select"):
        freeze(gm)


def test_theta_selecting_nothing_or_everything_says_so():
    data = _data((2, 784))
    nothing = ptqat_fx.report(ptqat_fx.quantize(mlp.build(), (data[0],), data, select=Select("small", theta=0.0), progress=False))
    assert nothing.selected == [] and "selected no layer" in str(nothing)
    everything = ptqat_fx.report(ptqat_fx.quantize(mlp.build(), (data[0],), data, select=Select("small", theta=10.0), progress=False))
    assert len(everything.selected) == 3 and "full QAT" in str(everything)


@pytest.mark.parametrize("name", HEAVY_RESNET)
def test_saved_bytes_within_the_targets_of_fp32_training(name):
    """Issue 3's memory acceptance: PTQAT (small) <= 1.2x and full QAT <= 1.5x the bytes
    that FP32 training of the original model keeps for backward."""
    build, shape = EXAMPLES[name]
    data = _data((16, *shape[1:]))
    model = build().train()
    float_bytes = saved_tensor_bytes(lambda: model(data[0]).sum())
    ratios = {}
    for strategy in ("small", "all"):
        gm = ptqat_fx.quantize(model, (data[0],), data, FAST, select=Select(strategy), progress=False).train()
        ratios[strategy] = saved_tensor_bytes(lambda: gm(data[0]).sum()) / float_bytes
    assert ratios["small"] <= 1.2, ratios
    assert ratios["all"] <= 1.5, ratios


def test_freeze_twice_changes_nothing():
    build, shape = EXAMPLES["vit"]
    data = _data(shape)
    gm = ptqat_fx.quantize(build(), (data[0],), data, select=Select("small"), progress=False)
    code, reference = gm.code, gm(data[0])
    freeze(gm)
    assert gm.code == code
    assert torch.equal(gm(data[0]), reference)
