"""convert(): integer weights checked against torch's own fake-quant ops, converted outputs
against the fake-quant model, packing, storage size and bad input."""
from __future__ import annotations

import pytest
import torch

import ptqat_fx
from ptqat_fx.layer_spec import layer_nodes
from ptqat_fx.passes.annotate import annotate
from ptqat_fx.lowering import pack_int4, quantize_dequantize, unpack_int4
from ptqat_fx.meta import converted as converted_record, layer_spec
from ptqat_fx.passes.convert import state_dict_bytes
from ptqat_fx.passes.insert_quantizers import insert_quantizers
from ptqat_fx.runtime.quantizer import quantizers
from ptqat_fx.capture import trace
from examples import mlp
from tests.export.quantized_examples import EXAMPLES, example_input, quantized

CASES = [(name, bits) for name in EXAMPLES for bits in (8, 4)]


@pytest.mark.parametrize("name,w_bits", CASES)
def test_converted_model_reproduces_fake_quant_model(name, w_bits):
    qmodel = quantized(name, w_bits)
    x = example_input(name, seed=7)
    with torch.no_grad():
        expected = qmodel(x)
        for pack in (False, True):
            # Same ops in the same order in float32: bit-identical, not just within tolerance.
            assert torch.equal(ptqat_fx.convert(qmodel, pack_int4_weights=pack)(x), expected)


@pytest.mark.parametrize("name,w_bits", CASES)
def test_weights_are_integers_matching_torch_fake_quantize(name, w_bits):
    qmodel = quantized(name, w_bits)
    converted = ptqat_fx.convert(qmodel)
    assert not quantizers(converted)
    state = converted.state_dict()
    checked = 0
    for node in layer_nodes(qmodel):
        spec = layer_spec(node)
        if spec.weight is None:
            continue
        quantizer = qmodel.get_submodule(spec.weight_quantizer)
        weight = qmodel.get_parameter(spec.weight).detach()
        values, scale = state[f"{spec.weight}_int"], state[f"{spec.weight}_scale"]
        assert spec.weight not in state and values.dtype == torch.int8
        assert values.min() >= -(2 ** (w_bits - 1)) and values.max() <= 2 ** (w_bits - 1) - 1
        reference = torch.fake_quantize_per_channel_affine(
            weight, quantizer.scale.detach(), torch.zeros(scale.numel(), dtype=torch.int32),
            quantizer.channel_axis, quantizer.qmin, quantizer.qmax,
        )
        assert torch.equal(values.float() * scale, reference)
        checked += 1
    assert checked == sum(1 for n in layer_nodes(qmodel) if layer_spec(n).weight)
    lowered = [converted_record(n) for n in converted.graph.nodes if converted_record(n) is not None]
    assert sum("weight" in m for m in lowered) == checked


def test_activation_quantize_dequantize_matches_torch_per_tensor_op():
    converted = ptqat_fx.convert(quantized("mlp", 8))
    scale = converted.get_buffer("input_quantizers.relu.scale")
    x = torch.randn(1000) * float(scale) * 300  # a third of it clips
    reference = torch.fake_quantize_per_tensor_affine(x, float(scale), 0, -128, 127)
    assert torch.equal(quantize_dequantize(x, scale, -128, 127, torch.int8), reference)
    lowered = [converted_record(n) for n in converted.graph.nodes if "activation" in (converted_record(n) or {})]
    assert [m["activation"] for m in lowered] == ["input_quantizers.flatten", "input_quantizers.relu", "input_quantizers.relu_1"]


def test_pack_int4_round_trips_every_value():
    values = torch.tensor([-8, -7, -1, 0, 1, 6, 7, -8, 3], dtype=torch.int8).reshape(3, 3)
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.numel() == 5
    assert packed[0] == (0x8 | (0x9 << 4))
    assert torch.equal(unpack_int4(packed, values.shape), values)


def test_state_dict_is_the_small_deployable_artefact():
    float_bytes = state_dict_bytes(mlp.build())
    int8 = ptqat_fx.convert(quantized("mlp", 8))
    int4 = ptqat_fx.convert(quantized("mlp", 4), pack_int4_weights=True)
    assert all(not t.is_floating_point() or t.numel() < 1000 for t in int8.state_dict().values())
    # MLP 784-128-128-10: weights dominate, so int8 ~ 1/4 and packed int4 ~ 1/8 of FP32.
    assert state_dict_bytes(int8) / float_bytes == pytest.approx(0.254, abs=0.005)
    assert state_dict_bytes(int4) / float_bytes == pytest.approx(0.129, abs=0.005)


def test_convert_leaves_the_fake_quant_model_unchanged():
    qmodel = quantized("resnet", 4)
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    ptqat_fx.convert(qmodel)
    after = qmodel.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_uncalibrated_model_is_refused_naming_the_quantizer():
    x = example_input("mlp")
    gm = insert_quantizers(annotate(trace(mlp.build())))
    with pytest.raises(ptqat_fx.CalibrationError, match=r"quantizer .fc1.weight_fake_quant. was never calibrated"):
        ptqat_fx.convert(gm)
    assert gm(x).shape == (8, 10)


def test_ptqat_model_lowers_to_the_same_integers():
    """Frozen layers (constant weights, frozen_conv) and fused trainable ones
    (quantized_conv/linear) lower exactly like their fake-quant form."""
    ptqat = quantized("resnet", 4, select=ptqat_fx.Select())
    kinds = {getattr(n.target, "__name__", "") for n in ptqat.graph.nodes if n.op == "call_function"}
    assert {"frozen_conv", "quantized_conv"} <= kinds
    x = example_input("resnet")
    converted = ptqat_fx.convert(ptqat)
    reference = ptqat_fx.convert(quantized("resnet", 4))
    assert torch.equal(converted(x), ptqat(x)) and not quantizers(converted)
    state, reference_state = converted.state_dict(), reference.state_dict()
    assert state.keys() == reference_state.keys()
    assert all(torch.equal(state[k], reference_state[k]) for k in state)
