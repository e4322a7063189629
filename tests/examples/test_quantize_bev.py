"""The four BEV stand-ins from their committed checkpoints through ``ptqat_fx``: the tracer's graph
equals eager, ``quantize`` at W4A8 quantizes every Conv/Linear layer (MHA in-projections via the
attention unfuse) and the report lists them, and W8A8 stays close to the float outputs."""
from __future__ import annotations

import copy
import importlib
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import ptqat_fx
from examples.bev import scenes
from examples.bev.train import MODELS, build
from ptqat_fx.runtime.attention import unfuse_attention
from ptqat_fx.coverage import coverage
from ptqat_fx.capture import trace

# Matrix products on camera/ego geometry (frustum unprojection, ego-motion warps, reference-point
# projection) have an operand that is not computed from any layer, so ``annotate`` keeps them in
# float; attention and adaptive-mixing products of two features are the quantized ones.
QUANTIZED_MATMULS = {
    "bevdet": set(),
    "bevdepth4d": set(),
    "bevformer": {f"decoder.{i}.self_attn.matmul_{j}" for i, j in ((0, 6), (0, 7), (1, 8), (1, 9))},
    "sparsebev": {f"layer.{owner}.matmul{suffix}" for owner, suffix in (
        ("self_attn", ""), ("self_attn", "_1"), ("mixing", "_3"), ("mixing", "_4"),
        ("self_attn", "_5"), ("self_attn", "_6"), ("mixing", "_8"), ("mixing", "_9"))},
}
# Relative L2 error of W8A8 on a scene other than the calibration one:
# (score output, worst output). Measured (0.037, 0.18), (0.063, 0.37), (0.023, 0.043),
# (0.042, 0.058); the bounds add a margin. BEVDet's rot/vel maps are nearly unlearned noise.
W8A8_BOUNDS = {"bevdet": (0.08, 0.3), "bevdepth4d": (0.12, 0.5), "bevformer": (0.06, 0.1), "sparsebev": (0.09, 0.12)}
SCORE = {"bevdet": "heatmap", "bevdepth4d": "heatmap", "bevformer": "all_cls", "sparsebev": "all_cls"}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Small ops on a shared 2-core machine: a second OpenMP thread only spin-waits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batches() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A calibration scene and a different evaluation scene, batch 1, both frames."""
    return tuple(torch.utils.data.default_collate([scenes.make_sample(seed)]) for seed in (7, 8))


def _model(name: str, batch: dict[str, torch.Tensor]) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    module = importlib.import_module(f"examples.bev.{name}")
    return build(name, f"examples/checkpoints/{name}.pt").eval(), module.inputs(batch)


def _relative_errors(outputs: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    return {key: float((outputs[key] - value).norm() / value.norm()) for key, value in reference.items()}


@pytest.mark.parametrize("name", MODELS)
def test_traced_graph_equals_eager(name: str, batches: tuple[dict[str, torch.Tensor], ...]) -> None:
    model, inputs = _model(name, batches[0])
    gm = trace(copy.deepcopy(model), example_inputs=inputs)
    with torch.no_grad():
        eager, traced = model(*inputs), gm(*inputs)
    assert eager.keys() == traced.keys()
    for key in eager:
        assert torch.equal(eager[key], traced[key]), key


@pytest.mark.parametrize("name", MODELS)
def test_w4a8_quantizes_every_layer_and_the_report_lists_them(name: str, batches: tuple[dict[str, torch.Tensor], ...]) -> None:
    model, inputs = _model(name, batches[0])
    qmodel = ptqat_fx.quantize(model, inputs, [inputs], ptqat_fx.QuantConfig(w_bits=4, a_bits=8), progress=False)
    report, found = ptqat_fx.report(qmodel), coverage(qmodel)
    assert found.traced_whole and found.share == 1.0 and not found.float_layers
    # One row per call site: a module called again (BEVFormer's encoder runs on both frames,
    # SparseBEV's decoder layer on both iterations) adds a ``path#k`` row.
    repeats = [row for row in report.rows if "#" in row.name]
    assert len(report.rows) == found.layers + len(repeats)
    # Every Conv2d/Linear of the model, with nn.MultiheadAttention split into q/k/v/out projections.
    unfused = copy.deepcopy(model)
    unfuse_attention(unfused)
    layers = {path for path, m in unfused.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    module_rows = [row for row in report.rows if row.kind in ("conv2d", "linear")]
    assert {row.name.partition("#")[0] for row in module_rows} == layers
    assert len(module_rows) - sum(row.kind != "matmul" for row in repeats) == len(layers)
    assert any(path.endswith("self_attn.q_proj") for path in layers) == (name in ("bevformer", "sparsebev"))
    assert all(row.w_bits == 4 and row.a_bits == 8 for row in module_rows)
    assert all(row.kind == "matmul" and row.a_bits == 8 for row in report.rows if row not in module_rows)
    assert all(row.discrepancy is not None and row.discrepancy >= 0 for row in report.rows)
    assert sum(bool(row.selected) for row in report.rows) == len(report.rows) // 2   # Select('small', fraction=0.5)
    text = str(report)
    assert all(row.name in text for row in report.rows)


@pytest.mark.parametrize("name", MODELS)
def test_w8a8_keeps_geometry_in_float_and_stays_close_to_float(name: str, batches: tuple[dict[str, torch.Tensor], ...]) -> None:
    model, inputs = _model(name, batches[0])
    _, held_out = _model(name, batches[1])
    config = ptqat_fx.QuantConfig(w_bits=8, a_bits=8)
    qmodel = ptqat_fx.quantize(model, inputs, [inputs], config, select=None, progress=False)
    assert {row.name for row in ptqat_fx.report(qmodel).rows if row.kind == "matmul"} == QUANTIZED_MATMULS[name]
    with torch.no_grad():
        errors = _relative_errors(qmodel.eval()(*held_out), model(*held_out))
    score_bound, worst_bound = W8A8_BOUNDS[name]
    assert errors[SCORE[name]] < score_bound, errors
    assert max(errors.values()) < worst_bound, errors
