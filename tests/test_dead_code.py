"""dead_code: fx's dead-code elimination, keeping the in-place writes a capture records."""
from __future__ import annotations

import onnxruntime
import torch
from torch import fx, nn

import ptqat_fx
from ptqat_fx.dead_code import eliminate_dead_code, writes_in_place


class Batched(nn.Module):
    """torchvision's detection transform in small: images copied into a zero batch, in place."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        batch = first.new_full([2, 3, 8, 8], 0)
        batch[0, :3].copy_(first)
        batch[1, :3].add_(second)
        torch.relu_(batch[1])
        unused = first * 2  # noqa: F841  (dead: removed)
        return self.conv(batch)


def test_in_place_writes_survive_and_dead_values_go():
    gm = fx.symbolic_trace(Batched())
    eliminate_dead_code(gm.graph)
    kept = [node.target for node in gm.graph.nodes]
    assert {"copy_", "add_", torch.relu_} <= set(kept)
    assert not any(node.target is not None and str(node.target).endswith("mul") for node in gm.graph.nodes)
    gm.recompile()
    first, second = torch.randn(3, 8, 8), torch.randn(3, 8, 8)
    assert torch.equal(gm(first, second), Batched.forward(gm, first, second))
    # fx's own elimination drops both writes: the batch stays zeros.
    plain = fx.symbolic_trace(Batched())
    plain.graph.eliminate_dead_code()
    assert not any(writes_in_place(node) for node in plain.graph.nodes)


def test_modules_and_keywords_that_write_in_place():
    gm = fx.symbolic_trace(nn.Sequential(nn.ReLU(inplace=True), nn.ReLU()))
    relu_in_place, relu = [node for node in gm.graph.nodes if node.op == "call_module"]
    assert writes_in_place(relu_in_place) and not writes_in_place(relu)


def test_export_keeps_images_copied_into_a_batch(tmp_path):
    """The exported graph reads its inputs: before, the export's dead-code elimination dropped
    the copies, the ONNX model convolved a constant zero batch and ignored its inputs."""
    torch.manual_seed(0)
    model = Batched().eval()
    images = [(torch.randn(3, 8, 8), torch.randn(3, 8, 8)) for _ in range(3)]
    qmodel = ptqat_fx.quantize(model, images[0], images[1:], select=None, progress=False).eval()
    path = tmp_path / "batched.onnx"
    ptqat_fx.export_onnx(qmodel, images[0], path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    engine = ptqat_fx.convert(qmodel, arithmetic="engine")
    for inputs in images:
        got = torch.from_numpy(session.run(None, dict(zip(names, (t.numpy() for t in inputs))))[0])
        with torch.no_grad():
            expected = engine(*inputs)
        assert expected.std() > 0.1
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
