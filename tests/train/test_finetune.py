"""finetune(): what it trains, the losses it computes (against recomputations), AMP, DDP
against one process on the same global batch, and the errors it raises."""
from __future__ import annotations

import copy
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import ptqat_fx
from examples import resnet_small

# W2A4: an error large enough that a few distillation steps visibly reduce it.
CONFIG = ptqat_fx.QuantConfig(w_bits=2, a_bits=4, w_observer="minmax", a_observer="minmax")


def _images(seed: int, batch: int = 8) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _ptqat_resnet(select: ptqat_fx.Select = ptqat_fx.Select("small")) -> tuple[nn.Module, torch.fx.GraphModule]:
    model = resnet_small.build(width=8)
    calibration = [_images(seed) for seed in (1, 2)]
    return model, ptqat_fx.quantize(model, (calibration[0],), calibration, CONFIG, select, progress=False)


class _TwoHeads(nn.Module):
    """A model with nested dict/tuple outputs, as detection heads have."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.a, self.b1, self.b2 = nn.Linear(12, 16), nn.Linear(16, 3), nn.Linear(16, 4), nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return {"a": self.a(h), "b": (self.b1(h), self.b2(h))}


def test_distillation_lowers_loss_trains_only_trainable_params():
    teacher, qmodel = _ptqat_resnet()
    before = copy.deepcopy(qmodel)
    data = [_images(seed) for seed in (3, 4)]
    with torch.no_grad():
        expected_first = F.mse_loss(before.train()(data[0]), teacher(data[0]))
    history = ptqat_fx.finetune(qmodel, data, teacher=teacher, steps=8, progress=False)
    assert history.steps == 8 and history.seconds > 0 and history.peak_memory_bytes is None
    torch.testing.assert_close(torch.tensor(history.loss[0]), expected_first, rtol=1e-5, atol=0)
    with torch.no_grad():
        after_loss = sum(F.mse_loss(qmodel(x), teacher(x)) for x in data)
        before_loss = sum(F.mse_loss(before(x), teacher(x)) for x in data)
    assert after_loss < 0.8 * before_loss
    trainable = {name for name, p in qmodel.named_parameters() if p.requires_grad}
    assert trainable and any(name.endswith(".scale") for name in trainable)
    old = dict(before.named_parameters()) | dict(before.named_buffers())
    for name, value in list(qmodel.named_parameters()) + list(qmodel.named_buffers()):
        if name in trainable:
            assert not torch.equal(value, old[name]), f"{name} did not train"
        else:
            assert torch.equal(value, old[name]), f"frozen {name} changed"


def test_loss_callable_sees_labels_and_nested_teacher_outputs():
    model = _TwoHeads().eval()
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
    qmodel = ptqat_fx.quantize(model, (x,), [x], CONFIG, ptqat_fx.Select("all"), progress=False)
    labels = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(1))
    seen = []

    def task_loss(outputs, batch):
        seen.append(batch[1])
        return F.cross_entropy(outputs["a"], batch[1])

    with torch.no_grad():
        expected = F.cross_entropy(copy.deepcopy(qmodel).train()(x)["a"], labels)
    history = ptqat_fx.finetune(qmodel, [(x, labels)], loss=task_loss, loss_takes="batch", epochs=3, lr=1e-2, progress=False)
    assert len(seen) == 3 and torch.equal(seen[0], labels)
    torch.testing.assert_close(torch.tensor(history.loss[0]), expected, rtol=1e-5, atol=0)
    assert history.loss[-1] < history.loss[0]
    with torch.no_grad():
        student, target = copy.deepcopy(qmodel).train()(x), model(x)
    expected = sum(F.mse_loss(s, t) for s, t in ((student["a"], target["a"]), *zip(student["b"], target["b"])))
    distilled = ptqat_fx.finetune(qmodel, [x], teacher=model, steps=1, progress=False)
    torch.testing.assert_close(torch.tensor(distilled.loss[0]), expected, rtol=1e-5, atol=0)


def test_bf16_autocast_on_cpu():
    teacher, qmodel = _ptqat_resnet()
    student = copy.deepcopy(qmodel).train()
    with torch.no_grad():
        fp32_loss = F.mse_loss(student(_images(3)), teacher(_images(3)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_loss = F.mse_loss(student(_images(3)).float(), teacher(_images(3)).float())
    history = ptqat_fx.finetune(qmodel, [_images(3), _images(4)], teacher=teacher, steps=6, amp="bf16", progress=False)
    # The first step's loss is the bf16 forward of the untrained model, not the fp32 one.
    torch.testing.assert_close(torch.tensor(history.loss[0]), bf16_loss, rtol=1e-5, atol=0)
    assert history.loss[0] != pytest.approx(fp32_loss.item(), rel=1e-3)
    assert history.loss[-1] < history.loss[0]
    assert all(p.dtype == torch.float32 for p in qmodel.parameters())


def _sgd(groups):
    return torch.optim.SGD(groups, momentum=0.9)  # learning rates come with the groups


# Step sizes learn fast enough that the LSQ gradient scale matters (see finetune._distributed).
TRAIN = {"optimizer": _sgd, "lr": 0.05, "scale_lr": 0.5, "progress": False}


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        teacher, qmodel = _ptqat_resnet()
        shards = [_images(seed, 16)[rank * 8:(rank + 1) * 8] for seed in (3, 4, 5, 6)]
        history = ptqat_fx.finetune(qmodel, shards, teacher=teacher, **TRAIN)
        torch.save({"state": qmodel.state_dict(), "loss": history.loss}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_ddp_matches_one_process_on_the_global_batch():
    teacher, qmodel = _ptqat_resnet()
    history = ptqat_fx.finetune(qmodel, [_images(seed, 16) for seed in (3, 4, 5, 6)], teacher=teacher, **TRAIN)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank")
        mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        ranks = [torch.load(f"{out}.{rank}") for rank in range(2)]
    untrained = _ptqat_resnet()[1].state_dict()
    trainable = [name for name, p in qmodel.named_parameters() if p.requires_grad]
    assert trainable
    for name, value in qmodel.state_dict().items():
        for rank in ranks:
            torch.testing.assert_close(rank["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(value, untrained[name]) == (name not in trainable), name
    # Each rank's loss is the mean over its half; the mean of the two is the global batch's.
    rank_mean = (torch.tensor(ranks[0]["loss"]) + torch.tensor(ranks[1]["loss"])) / 2
    torch.testing.assert_close(rank_mean, torch.tensor(history.loss), rtol=1e-5, atol=0)


def test_nothing_trainable_is_a_clear_error():
    teacher, qmodel = _ptqat_resnet(ptqat_fx.Select("none"))
    with pytest.raises(ptqat_fx.InputError, match="no trainable parameter.*Select"):
        ptqat_fx.finetune(qmodel, [_images(3)], teacher=teacher, progress=False)


def test_wrong_batch_structure_names_the_batch():
    teacher, qmodel = _ptqat_resnet()
    data = [_images(3), {"image": _images(4)}]
    with pytest.raises(ptqat_fx.InputError, match="batch 1 of the data is a dict"):
        ptqat_fx.finetune(qmodel, data, teacher=teacher, progress=False)


def test_teacher_with_other_output_structure_names_the_path():
    model = _TwoHeads().eval()
    x = torch.randn(16, 12)
    qmodel = ptqat_fx.quantize(model, (x,), [x], CONFIG, ptqat_fx.Select("small"), progress=False)

    class OneB(nn.Module):
        def forward(self, x):
            out = model(x)
            return {"a": out["a"], "b": out["b"][:1]}

    with pytest.raises(ptqat_fx.InputError, match=r"output\['b'\].*tuple of 2.*tuple of 1"):
        ptqat_fx.finetune(qmodel, [x], teacher=OneB(), progress=False)
