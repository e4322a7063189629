"""transformers' ``Conv1D`` (GPT-2's projections: ``torch.addmm(bias, x, weight)``, weight
``[in, out]``) is captured as the layer kind ``linear_transposed`` and quantized per output
column, like the ``nn.Linear`` holding the transposed weight."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import ptqat_fx
from ptqat_fx import QuantConfig
from ptqat_fx.capture import trace
from ptqat_fx.layer_spec import layer_specs
from ptqat_fx.runtime.linear_transposed import linear_transposed
from ptqat_fx.runtime.quantizer import quantizers


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D, as transformers writes it."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(_randn(nx, nf, seed=nf) * 0.2)
        self.bias = nn.Parameter(_randn(nf, seed=nf + 1) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class Mlp(nn.Module):
    """GPT-2's MLP (c_fc, GELU, c_proj), and an addmm of two activations that is no layer."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(4 * dim, dim), Conv1D(dim, 4 * dim)

    def forward(self, x):
        h = self.c_proj(F.gelu(self.c_fc(x)))
        flat = h.reshape(-1, h.shape[-1])
        return torch.addmm(flat, flat, flat.t().matmul(flat) * 1e-2).view(h.shape)


def _linear_twin(model: Mlp) -> nn.Module:
    """The same MLP with nn.Linear layers holding the transposed weights."""
    twin = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    with torch.no_grad():
        for linear, conv in ((twin[0], model.c_fc), (twin[2], model.c_proj)):
            linear.weight.copy_(conv.weight.t())
            linear.bias.copy_(conv.bias)
    return twin


def test_addmm_of_parameters_is_captured_as_linear_transposed():
    model, x = Mlp().eval(), _randn(2, 5, 8)
    gm = trace(model, example_inputs=(x,))
    layers = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is linear_transposed]
    assert [n.args[1].target for n in layers] == ["c_fc.weight", "c_proj.weight"]
    assert [n.args[2].target for n in layers] == ["c_fc.bias", "c_proj.bias"]
    # The addmm of activations is left as it was.
    assert len([n for n in gm.graph.nodes if n.target is torch.addmm]) == 1
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_conv1d_is_quantized_per_output_column_like_the_linear_twin():
    model, x = Mlp().eval(), _randn(2, 5, 8)
    calib = [(_randn(2, 5, 8, seed=seed),) for seed in (1, 2)]
    config = QuantConfig(w_bits=4, a_bits=8, w_observer="minmax", a_observer="minmax")
    gm = ptqat_fx.quantize(model, (x,), calib, config, select=None, progress=False)
    specs = {spec.weight: spec for spec in layer_specs(gm) if spec.kind == "linear_transposed"}
    assert set(specs) == {"c_fc.weight", "c_proj.weight"} and all(s.weight_quantizer for s in specs.values())
    steps = quantizers(gm)
    assert steps["c_fc.weight_fake_quant"].scale.numel() == 32 and steps["c_proj.weight_fake_quant"].scale.numel() == 8
    # The same steps as nn.Linear layers holding the transposed weights: one per output channel.
    twin = _linear_twin(model).eval()
    twin_gm = ptqat_fx.quantize(twin, (x,), calib, config, select=None, progress=False)
    for conv, linear in (("c_fc", "0"), ("c_proj", "2")):
        torch.testing.assert_close(steps[f"{conv}.weight_fake_quant"].scale,
                                   quantizers(twin_gm)[f"{linear}.weight_fake_quant"].scale)
    with torch.no_grad():
        fp = model(x)
        out = gm(x)
    assert not torch.equal(out, fp)  # the quantizers act
    assert ((out - fp).norm() / fp.norm()).item() < 0.2


def test_conv1d_finetunes_converts_and_round_trips(tmp_path):
    model, x = Mlp().eval(), _randn(2, 5, 8)
    calib = [(_randn(2, 5, 8, seed=seed),) for seed in (1, 2)]
    gm = ptqat_fx.quantize(model, (x,), calib, select=ptqat_fx.Select("all"), progress=False)
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    ptqat_fx.finetune(gm, calib, teacher=model, steps=2, lr=1e-2, progress=False)
    assert not torch.equal(before["c_fc.weight"], gm.get_parameter("c_fc.weight"))
    assert torch.equal(model.c_fc.weight, Mlp().c_fc.weight)  # the user's model is not trained
    with torch.no_grad():
        fake = gm.eval()(x)
        torch.testing.assert_close(ptqat_fx.convert(gm)(x), fake)
    ptqat_fx.save(gm, tmp_path / "m.pt")
    with torch.no_grad():
        assert torch.equal(ptqat_fx.load(tmp_path / "m.pt")(x), fake)
