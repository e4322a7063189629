"""export_onnx storage and shapes: packed INT4 ``raw_data`` (0.5 byte per weight), INT8 in
``raw_data``, unique node names for a layer called twice, and one dynamic-batch file that
runs at batch 1, 2 and 8."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

import ptqat_fx
from ptqat_fx.export.verify import onnxruntime_session, run_onnx
from ptqat_fx.lowering import integer_weight
from tests.export.quantized_examples import EXAMPLES, example_input, quantized


@pytest.mark.parametrize("w_bits", [4, 8])
def test_weights_are_packed_raw_data_that_onnx_decodes_to_the_integers(w_bits, tmp_path):
    qmodel = quantized("mlp", w_bits)
    model = ptqat_fx.export_onnx(qmodel, (example_input("mlp"),), tmp_path / "m.onnx")
    expected = {w.path: w.values for w in (integer_weight(qmodel, n) for n in qmodel.graph.nodes) if w is not None}
    stored = {i.name.removesuffix("_quantized"): i for i in model.graph.initializer if i.name.endswith("_quantized")}
    assert stored.keys() == expected.keys()
    for path, tensor in stored.items():
        assert tensor.data_type == (TensorProto.INT4 if w_bits == 4 else TensorProto.INT8)
        assert not tensor.int32_data
        count = expected[path].numel()
        assert len(tensor.raw_data) == (count + 1) // 2 if w_bits == 4 else count
        # onnx's own decoder is the reference for the nibble order.
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), expected[path].numpy())


def test_layer_called_twice_gives_unique_node_names(tmp_path):
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.refine = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.refine(torch.relu(self.refine(self.stem(x))))

    torch.manual_seed(0)
    x = torch.randn(4, 8)
    qmodel = ptqat_fx.quantize(Twice().eval(), (x,), [x], ptqat_fx.QuantConfig(w_bits=8, a_observer="minmax"),
                               progress=False).eval()
    model = ptqat_fx.export_onnx(qmodel, (x,), tmp_path / "m.onnx")
    names = [n.name for n in model.graph.node]
    assert len(names) == len(set(names))
    expected = ptqat_fx.convert(qmodel, arithmetic="engine")(x).detach().numpy()
    np.testing.assert_allclose(run_onnx(tmp_path / "m.onnx", (x,), "onnxruntime")[0], expected, atol=1e-5)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_dynamic_batch_file_runs_at_batch_1_2_8(name, tmp_path):
    qmodel = quantized(name, 4)
    ptqat_fx.export_onnx(qmodel, (example_input(name),), tmp_path / "m.onnx", dynamic_batch=True)
    model = onnx.load(tmp_path / "m.onnx")
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic, not a number
    session, converted = onnxruntime_session(tmp_path / "m.onnx"), ptqat_fx.convert(qmodel, arithmetic="engine")
    generator = torch.Generator().manual_seed(7)
    for batch in (1, 2, 8):
        x = torch.randn((batch, *EXAMPLES[name][1][1:]), generator=generator)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert got.shape[0] == batch
        np.testing.assert_allclose(got, converted(x).detach().numpy(), atol=1e-5)


@pytest.mark.slow  # ~1 min: quantizing and exporting ResNet-50 twice
def test_w4_resnet50_file_is_at_least_7_5x_smaller_than_fp32(tmp_path):
    from tests.zoo.torchvision_zoo import load_torchvision

    torchvision = load_torchvision()
    if torchvision is None:
        pytest.skip("torchvision not installed")
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.onnx.export(model, (x,), tmp_path / "fp32.onnx", dynamo=True, external_data=False, verbose=False)
    config = ptqat_fx.QuantConfig(w_bits=4, a_bits=8, w_observer="minmax", a_observer="minmax")
    qmodel = ptqat_fx.quantize(model, (x,), [x], config, progress=False).eval()
    ptqat_fx.export_onnx(qmodel, (x,), tmp_path / "w4.onnx")
    ratio = os.path.getsize(tmp_path / "fp32.onnx") / os.path.getsize(tmp_path / "w4.onnx")
    assert set(os.listdir(tmp_path)) == {"fp32.onnx", "w4.onnx"}  # both self-contained, no external data
    assert ratio >= 7.5, ratio  # measured 7.84 (102.2 MB against 13.0 MB)


def test_missing_onnxscript_error_names_it(monkeypatch, tmp_path):
    import sys

    from ptqat_fx.export import markers

    markers.translation_table.cache_clear()
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import now raises ModuleNotFoundError
    try:
        with pytest.raises(ModuleNotFoundError, match="pip install onnxscript"):
            ptqat_fx.export_onnx(quantized("mlp", 8), (example_input("mlp"),), tmp_path / "m.onnx")
    finally:
        markers.translation_table.cache_clear()
