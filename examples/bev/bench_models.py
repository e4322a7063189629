"""Size, structure and CPU speed of the four BEV stand-ins, eager against their FX-traced graphs.

    python -m examples.bev.bench_models --threads 2 --json /tmp/bench_models.json

Per model: parameters, Conv/Linear layers, FX graph nodes, whether the traced graph's outputs
equal eager bit for bit, and batch-1 forward time (median of ``--repeats``; wall and process CPU
time) eager and traced, the traced time as a ratio of eager.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from examples.bev import scenes
from examples.bev.train import MODELS, build, model_module


def _times(fn: Callable[..., object], inputs: tuple[torch.Tensor, ...], repeats: int) -> tuple[float, float]:
    fn(*inputs)
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn(*inputs)
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


@torch.no_grad()
def describe(name: str, batch: dict[str, torch.Tensor], repeats: int) -> dict[str, object]:
    model = build(name).eval()
    inputs = model_module(name).inputs(batch)
    traced = torch.fx.symbolic_trace(model)
    eager_out, traced_out = model(*inputs), traced(*inputs)
    wall, cpu = _times(model, inputs, repeats)
    traced_wall, _ = _times(traced, inputs, repeats)
    return {
        "model": name, "params": sum(p.numel() for p in model.parameters()),
        "conv_linear": sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules()),
        "fx_nodes": len(traced.graph.nodes), "traced_equals_eager": all(torch.equal(eager_out[k], traced_out[k]) for k in eager_out),
        "eager_wall_ms": 1e3 * wall, "eager_cpu_ms": 1e3 * cpu, "traced_wall_ms": 1e3 * traced_wall, "traced_vs_eager": traced_wall / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = scenes.example_batch(1)
    rows = [describe(name, batch, args.repeats) for name in MODELS]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"{'model':11} {'params':>9} {'conv/lin':>8} {'fx nodes':>8} {'fx==eager':>9} {'wall ms':>8} {'cpu ms':>8} {'fx/eager':>8}")
    for r in rows:
        print(f"{r['model']:11} {r['params']:9d} {r['conv_linear']:8d} {r['fx_nodes']:8d} {str(r['traced_equals_eager']):>9} "
              f"{r['eager_wall_ms']:8.1f} {r['eager_cpu_ms']:8.1f} {r['traced_vs_eager']:8.2f}")


if __name__ == "__main__":
    main()
