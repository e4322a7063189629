"""torch.compile(fullgraph=True) of the fake-quant model (train and eval) and of the converted
model: no graph breaks (``torch._dynamo.explain``), outputs and gradients equal to eager."""
from __future__ import annotations

import pytest
import torch

import ptqat_fx
from ptqat_fx.layer_spec import layer_specs
from tests.export.quantized_examples import example_input, quantized


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _graph_breaks(model: torch.nn.Module, x: torch.Tensor) -> int:
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_count == 1
    return explanation.graph_break_count


@pytest.mark.parametrize(
    "backend",
    # aot_eager traces forward and backward as inductor does, without the C++ build (~60 s).
    ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)],
)
def test_fake_quant_model_compiles_in_training_without_breaks(backend):
    model = quantized("mlp", 4).train()
    x = example_input("mlp")
    assert _graph_breaks(model, x) == 0
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    eager_out = model(x)
    eager_out.square().sum().backward()
    eager_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    compiled_out = compiled(x)
    compiled_out.square().sum().backward()
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        # Scale gradients sum over many elements; compiled kernels reorder those sums.
        torch.testing.assert_close(p.grad, eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("lower", [False, True], ids=["fake_quant_eval", "converted"])
def test_eval_model_compiles_without_breaks(lower):
    model = quantized("mlp", 4)
    if lower:
        model = ptqat_fx.convert(model, pack_int4_weights=True)
    x = example_input("mlp")
    assert _graph_breaks(model, x) == 0
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=1e-5, atol=1e-5)


def test_ptqat_model_compiles_in_training_without_breaks():
    """Frozen layers (constant weight) and fused trainable ones (quantized_linear)."""
    model = quantized("mlp", 4, select=ptqat_fx.Select(fraction=0.34)).train()
    assert [spec.selected for spec in layer_specs(model)].count(True) == 1
    x = example_input("mlp")
    assert _graph_breaks(model, x) == 0
    eager = model(x)
    eager.square().sum().backward()
    eager_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    compiled.square().sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert eager_grads and eager_grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in eager_grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-4, atol=1e-5, msg=name)
