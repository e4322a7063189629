"""The dense-task variants: FX trace equals eager, losses train, ``quantize`` needs no model change
and its report lists every layer, and the harness interface runs end to end."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ptqat_fx
from examples.bev import dense_targets, tasks
from ptqat_fx.coverage import coverage

SHAPES = {"bevdet_seg": {"seg": (1, 5, 64, 64)}, "bevformer_seg": {"seg": (1, 5, 64, 64)},
          "bevdepth4d_occ": {"occ": (1, 5, dense_targets.OCC_LAYERS, 64, 64), "depth": (1, 6, 48, 8, 22)}}


@pytest.fixture(scope="module")
def batches() -> dict[str, dict[str, torch.Tensor]]:
    return {name: tasks.render_batches(name, 3, 1, 1)[0] for name in tasks.TASKS}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return tasks.spec(name).build().eval()


@pytest.mark.parametrize("name", tasks.TASKS)
def test_trace_equals_eager_and_the_loss_has_gradients(name: str, batches: dict[str, dict[str, torch.Tensor]]) -> None:
    model, batch = _model(name), batches[name]
    inputs = tasks.spec(name).module.inputs(batch)
    with torch.no_grad():
        eager, traced = model(*inputs), torch.fx.symbolic_trace(model)(*inputs)
    assert {k: tuple(v.shape) for k, v in eager.items()} == SHAPES[name]
    assert all(torch.equal(eager[k], traced[k]) for k in eager)
    model.train()
    loss = tasks.task_loss(name, model(*inputs), tasks.as_tuple(name, batch))
    loss.backward()
    head = model.seg_head if hasattr(model, "seg_head") else model.occ_head
    assert loss.item() > 0 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


@pytest.mark.parametrize("name", tasks.TASKS)
def test_trunk_comes_from_the_detection_checkpoint(name: str) -> None:
    model = _model(name)
    loaded = tasks.load_matching(model, tasks.spec(name).trunk_checkpoint)
    head = "seg_head." if "seg" in name else "occ_head."
    own = [k for k in model.state_dict() if not k.startswith(head)]
    assert sorted(own) == loaded


@pytest.mark.slow
@pytest.mark.parametrize("name", tasks.TASKS)
def test_quantize_needs_no_model_change_and_the_report_lists_every_layer(name: str, batches: dict[str, dict[str, torch.Tensor]]) -> None:
    model, batch = _model(name), batches[name]
    before = copy.deepcopy(model.state_dict())
    inputs = tasks.spec(name).module.inputs(batch)
    qmodel = ptqat_fx.quantize(model, inputs, [tasks.as_tuple(name, batch)], ptqat_fx.QuantConfig(w_bits=4, a_bits=8), progress=False)
    found, report = coverage(qmodel), ptqat_fx.report(qmodel)
    assert found.traced_whole and found.share == 1.0 and not found.float_layers
    layers = {path for path, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert {row.name.partition("#")[0] for row in report.rows if row.kind in ("conv2d", "linear")} == layers
    assert all(row.name in str(report) for row in report.rows)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.slow
def test_task_interface_runs_end_to_end(tmp_path) -> None:
    name = "bevdet_seg"
    model = _model(name)
    tasks.load_matching(model, tasks.spec(name).trunk_checkpoint)
    path = tmp_path / "seg.pt"
    torch.save({"state_dict": {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}}, path)
    task = tasks.task(name, str(path), val_samples=2)
    fp = task.build_model()
    data = task.make_train_batches(5, 2, 1)
    before = task.evaluate(fp)
    assert 0 <= before["mIoU"] <= 1 and set(before) == {f"iou_{c}" for c in dense_targets.MAP_CLASSES} | {"mIoU"}
    qmodel = ptqat_fx.quantize(fp, data[0][:3], data, ptqat_fx.QuantConfig(w_bits=4, a_bits=8), progress=False)
    history = ptqat_fx.finetune(qmodel, data, loss=task.loss_fn, loss_takes="batch", steps=2, progress=False)
    assert history.steps == 2 and all(loss > 0 for loss in history.loss)
    assert 0 <= task.evaluate(qmodel)["mIoU"] <= 1
