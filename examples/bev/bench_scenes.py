"""How fast the synthetic scene set generates samples (scene drawing + rendered frames + targets).

    python -m examples.bev.bench_scenes --samples 8 --json /tmp/bench_scenes.json

Baseline in the same process: two-frame samples (what the temporal models need) against
current-frame-only samples (``frames=1``, what BEVDet needs), and two-frame samples with the dense
targets (``dense=True``: road layout painted, BEV map, occupancy, visibility) against plain
two-frame ones (``dense_cost`` = plain rate / dense rate), on the CPU and, where present, CUDA.
Wall and process CPU time are both reported: the CPU time is the steadier figure on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from examples.bev import scenes


def rates(count: int, device: str, frames: int, dense: bool = False) -> tuple[float, float]:
    """Samples per second of wall time and of process CPU time."""
    scenes.make_sample(0, device, frames, dense)            # warm-up (allocator, CUDA context)
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    for seed in range(1, count + 1):
        scenes.make_sample(seed, device, frames, dense)
    if device == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - wall), count / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        two_wall, two_cpu = rates(args.samples, device, frames=2)
        one_wall, one_cpu = rates(args.samples, device, frames=1)
        dense_wall, dense_cpu = rates(args.samples, device, frames=2, dense=True)
        rows.append({"device": device, "threads": args.threads, "two_frames_per_s": two_wall, "two_frames_per_cpu_s": two_cpu,
                     "one_frame_per_s": one_wall, "one_frame_per_cpu_s": one_cpu, "speedup": one_wall / two_wall,
                     "dense_per_s": dense_wall, "dense_per_cpu_s": dense_cpu, "dense_cost": two_cpu / dense_cpu})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"{'device':8} {'2 frames (samples/s, wall / CPU)':>34} {'1 frame (samples/s, wall / CPU)':>34} {'ratio':>6} "
          f"{'2 frames dense (wall / CPU)':>28} {'dense cost (CPU)':>17}")
    for r in rows:
        two = f"{r['two_frames_per_s']:.2f} / {r['two_frames_per_cpu_s']:.2f}"
        one = f"{r['one_frame_per_s']:.2f} / {r['one_frame_per_cpu_s']:.2f}"
        dense = f"{r['dense_per_s']:.2f} / {r['dense_per_cpu_s']:.2f}"
        print(f"{r['device']:8} {two:>34} {one:>34} {r['speedup']:6.2f} {dense:>28} {r['dense_cost']:17.2f}")


if __name__ == "__main__":
    main()
