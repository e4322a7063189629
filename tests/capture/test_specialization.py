"""A graph specialized to the example shapes refuses other shapes, wherever the graph goes:
after deepcopy, every pass, save/load, convert, under torch.compile; ONNX export still works."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

import ptqat_fx
from ptqat_fx.capture import specialization, trace
from ptqat_fx.errors import InputError
from ptqat_fx.export.verify import agreement
from ptqat_fx.meta import is_frozen
from ptqat_fx.runtime.shape_guard import check_input_shapes
from ptqat_fx.untrusted import FUNCTIONS

G = torch.Generator().manual_seed(0)
SHAPE = (2, 3, 4, 4)
# Same number of elements as SHAPE: without the check, reshape(2, 64) would run and return
# two rows mixing the one sample's pixels, a silently wrong result.
SAME_NUMEL = (1, 3, 4, 8)
REFUSED = r"input 'x' has shape \[1, 3, 4, 8\], but Flatten was captured for shape \[2, 3, 4, 4\]"


class Flatten(nn.Module):
    """An assert on a shape does not trace plainly: the graph reshapes to the example's (2, 64)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(64, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        b, c, h, w = y.shape
        assert c * h * w == self.fc.in_features
        return self.fc(y.reshape(b, c * h * w))


def _inputs(shape=SHAPE, n=3):
    return [torch.randn(shape, generator=G) for _ in range(n)]


@pytest.fixture(scope="module")
def quantized():
    data = _inputs()
    return ptqat_fx.quantize(Flatten().eval(), (data[0],), [(x,) for x in data], select=None, progress=False).eval()


def _refuses(model: nn.Module) -> None:
    with pytest.raises(InputError, match=REFUSED):
        model(torch.randn(SAME_NUMEL, generator=G))


def _guards(gm: fx.GraphModule) -> list[fx.Node]:
    return list(gm.graph.find_nodes(op="call_function", target=check_input_shapes))


def test_trace_inserts_one_check_after_the_placeholders_and_no_hook():
    gm = trace(Flatten().eval(), example_inputs=(torch.randn(SHAPE),))
    (guard,) = _guards(gm)
    assert guard.prev.op == "placeholder" and guard.args[1:] == (("x",), (SHAPE,), "Flatten")
    assert specialization(gm).input_shapes == {"x": SHAPE}
    assert not gm._forward_pre_hooks
    gm.graph.eliminate_dead_code()  # nothing uses its result; it is kept as torch._assert is
    assert _guards(gm) == [guard]


def test_deepcopy_keeps_the_check_and_the_specialization(quantized):
    copied = copy.deepcopy(quantized)
    _refuses(copied)
    assert specialization(copied).input_shapes == {"x": SHAPE}
    x = torch.randn(SHAPE, generator=G)
    with torch.no_grad():
        assert torch.equal(copied(x), quantized(x))


def test_the_briefs_batch_size_example_after_deepcopy():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(8, 8)

        def forward(self, x):
            if x.size(0) > 1:
                return self.l(x).reshape(x.size(0) * x.size(1), 8)
            return self.l(x)

    x = torch.randn(2, 3, 8, generator=G)
    q = ptqat_fx.quantize(Branch(), (x,), [(x,)], select=None, progress=False)
    with pytest.raises(InputError, match=r"input 'x' has shape \[4, 3, 8\], but Branch was captured for shape \[2, 3, 8\]"):
        copy.deepcopy(q)(torch.randn(4, 3, 8))


def test_check_survives_quantize_with_freeze_in_train_and_eval():
    data = _inputs()
    q = ptqat_fx.quantize(Flatten().eval(), (data[0],), [(x,) for x in data], select=ptqat_fx.Select(), progress=False)
    assert any(is_frozen(n) for n in q.graph.nodes)  # freeze rewrote the graph
    assert len(_guards(q)) == 1
    for mode in (True, False):
        _refuses(copy.deepcopy(q).train(mode))


def test_save_load_keeps_the_check_and_the_specialization(quantized, tmp_path):
    ptqat_fx.save(quantized, tmp_path / "m.pt")
    loaded = ptqat_fx.load(tmp_path / "m.pt")
    _refuses(loaded)
    assert specialization(loaded) == specialization(quantized)
    x = torch.randn(SHAPE, generator=G)
    with torch.no_grad():
        assert torch.equal(loaded(x), quantized(x))


def test_load_allows_exactly_the_check_among_ptqat_runtime_names():
    assert FUNCTIONS["ptqat_fx.runtime.shape_guard.check_input_shapes"] is check_input_shapes
    assert [name for name in FUNCTIONS if name.startswith("ptqat_fx.runtime.shape_guard")] == [
        "ptqat_fx.runtime.shape_guard.check_input_shapes"
    ]


def test_convert_keeps_the_check(quantized):
    converted = ptqat_fx.convert(quantized)
    _refuses(converted)
    x = torch.randn(SHAPE, generator=G)
    with torch.no_grad():
        # convert equals fake-quant up to a rounding flip of the output layer's input.
        torch.testing.assert_close(converted(x), quantized(x), rtol=0, atol=0.05)


def test_compile_has_no_graph_break_and_still_refuses(quantized):
    torch._dynamo.reset()
    x = torch.randn(SHAPE, generator=G)
    explanation = torch._dynamo.explain(quantized)(x)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(quantized, fullgraph=True, backend="aot_eager")(x), quantized(x))
        # The check raises while Dynamo traces the new shape: it falls back to eager, which raises.
        _refuses(torch.compile(quantized, backend="aot_eager"))
    torch._dynamo.reset()


def test_onnx_export_of_a_specialized_model_agrees_with_onnxruntime(quantized, tmp_path):
    x = torch.randn(SHAPE, generator=G)
    model = ptqat_fx.export_onnx(quantized, (x,), tmp_path / "m.onnx")
    assert [tuple(d.dim_value for d in i.type.tensor_type.shape.dim) for i in model.graph.input] == [SHAPE]
    for runtime, result in agreement(tmp_path / "m.onnx", ptqat_fx.convert(quantized), (x,)).items():
        assert result.max_abs_error <= 0.05, runtime


def test_structured_input_is_named_by_its_place_in_the_structure():
    class Dict(nn.Module):
        def forward(self, batch):
            image = batch["image"]
            if image.size(0) > 1:  # a shape decides Python control flow
                image = image.reshape(image.size(0) * image.size(1))
            return image + batch["aux"][0].sum()

    inputs = {"image": torch.randn(2, 3), "aux": [torch.randn(5)]}
    gm = trace(Dict(), example_inputs=(inputs,))
    assert specialization(gm).input_shapes == {"batch['image']": (2, 3), "batch['aux'][0]": (5,)}
    with pytest.raises(InputError, match=r"input \"batch\['aux'\]\[0\]\" has shape \[4\], but Dict .* \[5\]"):
        copy.deepcopy(gm)({"image": torch.randn(2, 3), "aux": [torch.randn(4)]})


def test_nested_graph_gets_its_own_check():
    class ValueBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Flatten()

        def forward(self, x):
            y = self.inner(x)
            return y * 2 if y.sum() > 0 else y  # a tensor value: this forward runs eagerly

    gm = trace(ValueBranch().eval(), example_inputs=(torch.randn(SHAPE),), auto_leaf=True)
    inner = gm.get_submodule("model.inner")
    assert isinstance(inner, fx.GraphModule) and len(_guards(inner)) == 1
    assert specialization(gm) is None and specialization(inner).input_shapes == {"x": SHAPE}
    _refuses(copy.deepcopy(gm))
