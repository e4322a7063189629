"""torch.fx with example values (ptqat_fx.capture) against torch.export (non-strict) as the
capture front end, on the idioms of issue 12: does each capture, is the graph equal to eager,
does it keep ``call_module`` nodes (what the passes rewrite), and the seconds, side by side.

Run: ``PYTHONPATH=. python bench/capture_frontends.py`` (writes bench/capture_frontends.json).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from ptqat_fx.capture import trace
from tests.capture.test_nested import Gated
from tests.capture.test_shape_idioms import AssertChannels, CompareSizes, FoldSequence, PerSample, Rearranges
from tests.zoo.models import ClampSTE


class WithFunction(nn.Module):
    """A custom autograd.Function between two layers."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.b(ClampSTE.apply(self.a(x)))


def _cases() -> dict[str, tuple[nn.Module, tuple]]:
    g = torch.Generator().manual_seed(0)
    return {
        "if x.size(2) > y.size(2)": (CompareSizes(), (torch.randn(1, 3, 8, 8, generator=g), torch.randn(1, 3, 4, 4, generator=g))),
        "for ix in range(B)": (PerSample(), (torch.randn(3, 4, generator=g),)),
        "x.view(b * s, *x.shape[2:])": (FoldSequence(), (torch.randn(2, 3, 2, 5, 5, generator=g),)),
        "assert C == 3": (AssertChannels(), (torch.randn(2, 3, 4, 4, generator=g),)),
        "einops.rearrange": (Rearranges(), (torch.randn(2, 3, 4, 4, generator=g),)),
        "tensor-value branch (root)": (Gated(), (torch.randn(2, 3, 6, 6, generator=g),)),
        "autograd.Function": (WithFunction(), (torch.randn(2, 4, generator=g),)),
    }


def _run(front: str, model: nn.Module, inputs: tuple) -> dict:
    start = time.perf_counter()
    try:
        if front == "fx":
            gm = trace(model, example_inputs=inputs, auto_leaf=True)
        else:
            gm = torch.export.export(model, inputs, strict=False).module()
    except Exception as error:
        return {"ok": False, "error": f"{type(error).__name__}: {str(error)[:160]}", "s": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    with torch.no_grad():
        equal = torch.equal(gm(*inputs), model(*inputs))
    modules = sum(n.op == "call_module" for n in gm.graph.nodes)
    functions = sorted({str(getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes if n.op == "call_function"})
    return {"ok": True, "equal": equal, "call_module": modules, "functions": functions[:8], "s": seconds}


def main() -> None:
    rows = {}
    for name, (model, inputs) in _cases().items():
        model.eval()
        rows[name] = {front: _run(front, model, inputs) for front in ("fx", "export")}
    Path("bench/capture_frontends.json").write_text(json.dumps(rows, indent=1))
    print(f"{'idiom':32} {'fx':>26} {'export (non-strict)':>44}")
    for name, row in rows.items():
        cells = []
        for front in ("fx", "export"):
            r = row[front]
            cells.append(f"ok eq={r['equal']} mods={r['call_module']} {r['s']:.2f}s" if r["ok"] else "FAIL " + r["error"][:38])
        print(f"{name:32} {cells[0]:>26} {cells[1]:>44}")


if __name__ == "__main__":
    main()
