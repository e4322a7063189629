"""What quantize() leaves in memory: nothing but the returned model's parameters and buffers.

On a GPU, tensors kept after quantize() count in training's peak memory. Two ways they were
kept (issue 15, ResNet-50 PTQAT peaking at 1.33x FP32): weight observers holding a float
copy of every weight on the returned model, and reference cycles (an fx GraphModule is one
with its Graph) holding calibration's recorded float outputs, the analysis's quantized
weights and the traced copy's pre-folding modules until Python's next full collection.
"""
from __future__ import annotations

import gc
import types

import torch

import ptqat_fx
from examples import resnet_small

FAST = ptqat_fx.QuantConfig(w_observer="minmax", a_observer="minmax")


def _storages(tensors) -> dict[int, int]:
    """Distinct real storages; fake and meta tensors (left by compile tests) hold no memory."""
    storages = {}
    for t in tensors:
        if isinstance(t, torch._subclasses.FakeTensor) or t.is_meta:
            continue
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return storages


def _reachable_tensors(root: object) -> list[torch.Tensor]:
    """Every tensor reachable from ``root`` through Python references; classes, modules and
    functions (whose globals are process state, not the model's) are not followed."""
    seen, found, stack = set(), [], [root]
    skipped = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skipped):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
            continue
        stack.extend(gc.get_referents(obj))
    return found


def _quantized_with_gc_off(select: ptqat_fx.Select):
    data = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    model = resnet_small.build().train()
    gc.collect()
    gc.disable()
    try:
        gm = ptqat_fx.quantize(model, (data[0],), data, FAST, select, progress=False)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        garbage = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    return gm, garbage


def test_quantize_leaves_no_tensor_in_reference_cycles():
    for select in (ptqat_fx.Select("small", fraction=0.5), ptqat_fx.Select("all")):
        _, garbage = _quantized_with_gc_off(select)
        # Before the fix: 85 tensors, 2.0 MB (the record, the quantized weights, the pre-fold copy).
        assert sum(_storages(garbage).values()) == 0, [tuple(t.shape) for t in garbage][:10]


def test_returned_model_holds_only_its_parameters_and_buffers():
    gm, _ = _quantized_with_gc_off(ptqat_fx.Select("small", fraction=0.5))
    own = _storages([*gm.parameters(), *gm.buffers()])
    extra = {ptr: n for ptr, n in _storages(_reachable_tensors(gm)).items() if ptr not in own}
    # Before the fix: every weight observer's float copy of its weight.
    assert sum(extra.values()) == 0, extra
