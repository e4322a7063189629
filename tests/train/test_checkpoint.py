"""Checkpoint and resume: a fine-tune killed with SIGKILL mid-epoch and resumed ends
bit-identical to the uninterrupted run; checkpoints hold no pickled code."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import ptqat_fx

# One run: a shuffling DataLoader, dropout (RNG draws inside the steps), Adam and an LR
# schedule, 3 epochs of 4 batches; "kill" SIGKILLs itself during step 6 (epoch 1, batch 2),
# after the checkpoint written at step 6.
WORKER = textwrap.dedent('''
    import os, signal, sys
    import torch
    import torch.nn.functional as F
    import ptqat_fx
    torch.set_num_threads(1)
    model_path, checkpoint, out, mode = sys.argv[1:5]
    torch.manual_seed(123 if mode == "resume" else 0)  # resume must not depend on the process's seed
    qmodel = ptqat_fx.load(model_path).train()
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=generator), torch.randint(0, 4, (32,), generator=generator)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True)
    calls = [0]
    def criterion(outputs, targets):
        calls[0] += 1
        if mode == "kill" and calls[0] == 7:
            os.kill(os.getpid(), signal.SIGKILL)
        return F.cross_entropy(outputs, targets)
    kwargs = dict(loss=criterion, epochs=3, lr=1e-2, progress=False,
                  schedule=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 3, gamma=0.5))
    if mode == "kill":
        ptqat_fx.finetune(qmodel, loader, checkpoint=checkpoint, checkpoint_every=2, **kwargs)
    history = ptqat_fx.finetune(qmodel, loader, resume=checkpoint if mode == "resume" else None, **kwargs)
    torch.save({"state": qmodel.state_dict(), "loss": history.loss}, out)
''')


def _model(path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 4)).train()
    x = torch.randn(16, 8)
    config = ptqat_fx.QuantConfig(w_observer="minmax", a_observer="minmax")
    ptqat_fx.save(ptqat_fx.quantize(model, (x,), [x], config, ptqat_fx.Select("all"), progress=False), path)


def _run(tmp_path, mode):
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(tmp_path / "q.ptqat"), str(tmp_path / f"{mode}.ckpt"),
         str(tmp_path / f"{mode}.out"), mode],
        cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()}, stderr=subprocess.PIPE,
    )


@pytest.mark.slow
def test_sigkilled_run_resumes_bit_identical(tmp_path):
    _model(tmp_path / "q.ptqat")
    full, killed = _run(tmp_path, "full"), _run(tmp_path, "kill")
    assert killed.wait(timeout=300) == -signal.SIGKILL, killed.stderr.read().decode()
    (tmp_path / "kill.ckpt").rename(tmp_path / "resume.ckpt")
    assert not (tmp_path / "resume.ckpt.tmp").exists()  # written atomically
    resumed = _run(tmp_path, "resume")
    assert full.wait(timeout=300) == 0, full.stderr.read().decode()
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    expected, got = torch.load(tmp_path / "full.out"), torch.load(tmp_path / "resume.out")
    assert len(expected["loss"]) == 12 and got["loss"] == expected["loss"]
    for name, value in expected["state"].items():
        assert torch.equal(got["state"][name], value), name
    # Not trivially equal: training changed the model.
    initial = ptqat_fx.load(tmp_path / "q.ptqat").state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in expected["state"].items())


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _checkpointed(tmp_path):
    """A one-step run of a small classifier that wrote its checkpoint to ``tmp_path / "c"``."""
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    x = torch.randn(8, 8)
    qmodel = ptqat_fx.quantize(model, (x,), [x], select=ptqat_fx.Select("all"), progress=False)
    batches = [(x, torch.randint(0, 4, (8,)))]
    ptqat_fx.finetune(qmodel, batches, loss=nn.CrossEntropyLoss(), checkpoint=tmp_path / "c", checkpoint_every=1, progress=False)
    return qmodel, batches


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    qmodel, batches = _checkpointed(tmp_path)
    state = torch.load(tmp_path / "c", weights_only=True)
    state["history"]["evil"] = _Evil(tmp_path / "pwned")
    torch.save(state, tmp_path / "evil")
    with open(tmp_path / "plain", "wb") as file:
        pickle.dump(_Evil(tmp_path / "pwned"), file)
    for name in ("evil", "plain"):
        with pytest.raises(ptqat_fx.SerializationError, match="not a readable finetune checkpoint"):
            ptqat_fx.finetune(qmodel, batches, loss=nn.CrossEntropyLoss(), resume=tmp_path / name, progress=False)
    assert not (tmp_path / "pwned").exists()


def test_resume_from_another_run_is_refused(tmp_path):
    qmodel, batches = _checkpointed(tmp_path)
    with pytest.raises(ptqat_fx.ConfigError, match="written by a run with .*'epochs': 1"):
        ptqat_fx.finetune(qmodel, batches, loss=nn.CrossEntropyLoss(), epochs=2, resume=tmp_path / "c", progress=False)
