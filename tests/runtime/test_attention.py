"""TracedMultiheadAttention equals nn.MultiheadAttention; quantize() quantizes its projections."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ptqat_fx
import copy

from ptqat_fx.runtime.attention import TracedMultiheadAttention, unfuse_attention, unfused_copy
from ptqat_fx.coverage import coverage
from ptqat_fx.layer_spec import layer_specs

G = torch.Generator().manual_seed(0)
MASKS = {
    "none": {},
    "key_padding_bool": {"key_padding_mask": torch.rand(2, 5, generator=G) > 0.7},
    "attn_bool_2d": {"attn_mask": torch.rand(4, 5, generator=G) > 0.7},
    "attn_float_3d": {"attn_mask": torch.randn(2 * 4, 4, 5, generator=G)},
}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("need_weights", [True, False])
def test_outputs_equal_torch_multihead_attention(batch_first, mask, need_weights):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=12, vdim=12).eval()
    traced = TracedMultiheadAttention.from_float(reference).eval()
    query = torch.randn(2, 4, 16, generator=G)
    key = torch.randn(2, 5, 12, generator=G)
    if not batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    expected = reference(query, key, key, need_weights=need_weights, **MASKS[mask])
    out = traced(query, key, key, need_weights=need_weights, **MASKS[mask])
    torch.testing.assert_close(out[0], expected[0], rtol=1e-5, atol=1e-6)
    if need_weights:
        torch.testing.assert_close(out[1], expected[1], rtol=1e-5, atol=1e-6)
    else:
        assert out[1] is None


class SelfAttention(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 4, **kwargs)

    def forward(self, x):
        return self.attention(x, x, x, need_weights=False)[0]


def test_quantize_quantizes_the_projections_with_one_shared_input_quantizer():
    x = torch.randn(6, 2, 16, generator=G)
    model = SelfAttention().train()
    gm = ptqat_fx.quantize(model, (x,), config=ptqat_fx.QuantConfig(w_bits=8, a_bits=8), progress=False)
    specs = {spec.name: spec for spec in layer_specs(gm)}
    names = [f"attention.{p}_proj" for p in "qkv"]
    assert set(names + ["attention.out_proj"]) <= set(specs)
    assert sum(spec.kind == "matmul" for spec in specs.values()) == 2
    assert len({specs[name].input_quantizers for name in names}) == 1
    assert coverage(gm).share == 1.0
    assert isinstance(model.attention, nn.MultiheadAttention)
    gm.eval()
    assert ((gm(x) - model.eval()(x)).norm() / model(x).norm()) < 0.03


def test_unsupported_multihead_attention_is_kept_and_reported_in_float():
    model = SelfAttention(add_bias_kv=True)
    assert unfuse_attention(model) == {"attention": "kept: bias_k/bias_v/add_zero_attn are not supported"}
    gm = ptqat_fx.quantize(model, (torch.randn(6, 2, 16, generator=G),), progress=False)
    assert coverage(gm).float_layers == ["attention.out_proj"]


def test_transformer_encoder_layer_takes_the_unfused_attention():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)).eval()
    x = torch.randn(3, 5, 16, generator=G)
    config = ptqat_fx.QuantConfig(w_bits=8, a_bits=8)
    gm = ptqat_fx.quantize(model, (x,), [x], config, select=None, progress=False)
    assert coverage(gm).share == 1.0
    assert gm.get_submodule("1.self_attn.q_proj.input_quantizer").calibrated
    with torch.no_grad():
        assert ((gm(x) - model(x)).norm() / model(x).norm()) < 0.03


def test_unfused_copy_equals_unfusing_a_deep_copy_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.TransformerEncoderLayer(16, 4, 32, batch_first=True),
        nn.ModuleDict({"kept": nn.MultiheadAttention(16, 4, add_bias_kv=True)}),
    ).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = copy.deepcopy(model)
    unfuse_attention(expected)
    got = unfused_copy(model)
    assert type(got[0].self_attn) is TracedMultiheadAttention
    assert type(got[1]["kept"]) is nn.MultiheadAttention and got[1]["kept"] is not model[1]["kept"]
    assert got.state_dict().keys() == expected.state_dict().keys()
    assert all(torch.equal(got.state_dict()[k], v) for k, v in expected.state_dict().items())
    stored = {t.untyped_storage().data_ptr() for t in model.state_dict().values() if t.numel()}
    assert not stored & {t.untyped_storage().data_ptr() for t in got.state_dict().values() if t.numel()}
    assert type(model[0].self_attn) is nn.MultiheadAttention
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    x = torch.randn(2, 5, 16)
    assert torch.equal(got[0](x), expected[0](x))
