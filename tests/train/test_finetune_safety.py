"""finetune's numerical safety and the inputs users pass: a NaN batch stops it with the model
intact, step sizes stay positive at any learning rate, a standard criterion takes the targets."""
from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptqat_fx
from ptqat_fx.errors import NonFiniteError
from ptqat_fx.runtime.quantizer import quantizers

finetune_module = sys.modules[ptqat_fx.finetune.__module__]
CONFIG = ptqat_fx.QuantConfig(w_bits=4, a_bits=8, w_observer="minmax", a_observer="minmax")


def _classifier(select: ptqat_fx.Select = ptqat_fx.Select("all")):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    return model, ptqat_fx.quantize(model, (x,), [x], CONFIG, select, progress=False)


def _batches(n: int, nan_at: int | None = None):
    generator = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 8, generator=generator), torch.randint(0, 4, (8,), generator=generator)) for _ in range(n)]
    if nan_at is not None:
        batches[nan_at][0][0, 0] = float("nan")
    return batches


def _all_finite(module):
    return all(t.isfinite().all() for t in [*module.parameters(), *module.buffers()] if t.is_floating_point())


def test_nan_batch_at_step_3_stops_with_the_step_named_and_no_nan_in_the_model():
    _, qmodel = _classifier()
    data = _batches(6, nan_at=3)
    reference = copy.deepcopy(qmodel)
    ptqat_fx.finetune(reference, data[:3], loss=nn.CrossEntropyLoss(), lr=1e-2, progress=False)
    with pytest.raises(NonFiniteError, match=r"step 3 \(batch 3 of epoch 0\): the loss is nan.*on_nonfinite='skip'"):
        ptqat_fx.finetune(qmodel, data, loss=nn.CrossEntropyLoss(), lr=1e-2, progress=False)
    assert _all_finite(qmodel)
    # Left at its last finite state: exactly what three clean steps give.
    for (name, value), expected in zip(qmodel.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(value, expected), name


def test_nonfinite_gradient_is_named():
    _, qmodel = _classifier()

    def exploding(outputs, targets):
        # Finite (the added term is 0) while its gradient is not: sqrt's slope at 0 is infinite.
        return F.cross_entropy(outputs, targets) + (outputs - outputs.detach()).abs().sqrt().sum()

    with pytest.raises(NonFiniteError, match=r"step 0 .*the gradient of '.*' is not finite"):
        ptqat_fx.finetune(qmodel, _batches(2), loss=exploding, progress=False)
    assert _all_finite(qmodel)


def test_skip_policy_skips_and_counts_nonfinite_steps():
    _, qmodel = _classifier()
    history = ptqat_fx.finetune(qmodel, _batches(6, nan_at=3), loss=nn.CrossEntropyLoss(), on_nonfinite="skip",
                                lr=1e-2, progress=False)
    assert history.skipped == [3] and len(history.loss) == 5 and _all_finite(qmodel)


def test_huge_learning_rate_keeps_step_sizes_positive():
    teacher, qmodel = _classifier()
    x = [torch.randn(8, 8, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    before = {name: q.scale.detach().clone() for name, q in quantizers(qmodel).items()}
    ptqat_fx.finetune(qmodel, x, teacher=teacher, lr=1e6, steps=1, progress=False)
    factor = finetune_module.MAX_STEP_SIZE_FACTOR
    # One step of lr=1e6 pushes every step size far past both bounds: the clamp holds each at one.
    for name, q in quantizers(qmodel).items():
        at_bound = torch.isclose(q.scale, before[name] / factor) | torch.isclose(q.scale, before[name] * factor)
        assert at_bound.all(), name
    ptqat_fx.finetune(qmodel, x, teacher=teacher, lr=1e6, steps=8, on_nonfinite="skip", progress=False)
    steps = [q.scale for q in quantizers(qmodel).values()]
    assert steps and all((s >= finetune_module.MIN_STEP_SIZE).all() for s in steps)


def test_step_sizes_far_below_the_learning_rate_do_not_collapse_the_output():
    # Activations of ~1e-5 (random-init networks whose eval BatchNorms shrink every block), so
    # step sizes of ~1e-7, far below lr, which Adam moves every parameter by: unbounded, one step
    # sends them to the floor or grows them ~1e4x, and every activation rounds to 0.
    torch.manual_seed(0)
    # No biases, which Adam would also move by lr: here only the activations are small.
    model = nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False)).eval()
    x = 1e-5 * torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    qmodel = ptqat_fx.quantize(model, (x,), [x], CONFIG, ptqat_fx.Select("all"), progress=False)
    data = [1e-5 * torch.randn(8, 8, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    before = {name: q.scale.detach().clone() for name, q in quantizers(qmodel).items()}
    activation_steps = [s for name, s in before.items() if "weight" not in name]
    assert activation_steps and max(s.max() for s in activation_steps) < 1e-5  # far below lr
    ptqat_fx.finetune(qmodel, data, teacher=model, lr=1e-3, steps=2, progress=False)
    factor = finetune_module.MAX_STEP_SIZE_FACTOR ** 2
    for name, q in quantizers(qmodel).items():
        assert ((q.scale >= before[name] / factor) & (q.scale <= before[name] * factor)).all(), name
    with torch.no_grad():
        out, ref = qmodel.eval()(x), model(x)
    # Still close to the float model (activations rounded to zero give an error of ~1).
    assert ((out - ref).norm() / (ref - ref.mean(0)).norm()).item() < 0.3


def test_cross_entropy_criterion_on_an_xy_dataloader():
    _, qmodel = _classifier()
    x, y = torch.cat([b[0] for b in _batches(4)]), torch.cat([b[1] for b in _batches(4)])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    with torch.no_grad():
        expected = F.cross_entropy(copy.deepcopy(qmodel).train()(x[:8]), y[:8])
    history = ptqat_fx.finetune(qmodel, loader, loss=nn.CrossEntropyLoss(), epochs=3, lr=1e-2, progress=False)
    assert history.steps == 12
    torch.testing.assert_close(torch.tensor(history.loss[0]), expected, rtol=1e-6, atol=0)
    assert history.loss[-1] < history.loss[0]


def test_criterion_without_targets_names_the_batch():
    _, qmodel = _classifier()
    data = [b[0] for b in _batches(2)]
    with pytest.raises(ptqat_fx.InputError, match="batch 0 holds only the model input.*loss_takes='batch'"):
        ptqat_fx.finetune(qmodel, data, loss=nn.CrossEntropyLoss(), progress=False)


def test_epoch_bar_has_a_total(monkeypatch):
    seen, original = {}, finetune_module.progress_bar

    def spy(iterable, desc, enabled, **kwargs):
        seen.update(kwargs)
        return original(iterable, desc, enabled, **kwargs)

    monkeypatch.setattr(finetune_module, "progress_bar", spy)
    _, qmodel = _classifier()
    ptqat_fx.finetune(qmodel, _batches(3), loss=nn.CrossEntropyLoss(), epochs=2, progress=False)
    assert seen["total"] == 6


def test_one_shot_iterator_with_several_epochs_is_refused_before_any_step():
    _, qmodel = _classifier()
    before = copy.deepcopy(qmodel.state_dict())
    with pytest.raises(ptqat_fx.ConfigError, match="one-shot generator.*epochs=2"):
        ptqat_fx.finetune(qmodel, (b for b in _batches(3)), loss=nn.CrossEntropyLoss(), epochs=2, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in qmodel.state_dict().items())


def test_float_model_is_refused_with_the_fix():
    model, _ = _classifier()
    with pytest.raises(ptqat_fx.InputError, match="finetune was given a Sequential that ptqat_fx.quantize never made"):
        ptqat_fx.finetune(model, _batches(2), loss=nn.CrossEntropyLoss(), progress=False)
