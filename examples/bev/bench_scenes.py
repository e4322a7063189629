"""How fast the synthetic scene set generates samples (scene drawing + two rendered frames + targets).

    python -m examples.bev.bench_scenes --samples 8 --json /tmp/bench_scenes.json

Baseline in the same process: ray-casting one box at a time (``BOX_CHUNK = 1``) against the
default chunking, on the CPU and, where present, on CUDA.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from examples.bev import scenes


def samples_per_second(count: int, device: str, chunk: int | None) -> float:
    saved = dict(scenes.BOX_CHUNK)
    if chunk is not None:
        scenes.BOX_CHUNK[device] = chunk
    try:
        scenes.make_sample(0, device)                       # warm-up (allocator, CUDA context)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for seed in range(1, count + 1):
            scenes.make_sample(seed, device)
        return count / (time.perf_counter() - start)
    finally:
        scenes.BOX_CHUNK.clear()
        scenes.BOX_CHUNK.update(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        base = samples_per_second(args.samples, device, chunk=1)
        fast = samples_per_second(args.samples, device, chunk=None)
        rows.append({"device": device, "threads": args.threads, "one_box_per_s": base, "chunked_per_s": fast,
                     "chunk": scenes.BOX_CHUNK[device], "speedup": fast / base})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"{'device':8} {'chunk':>5} {'one box (samples/s)':>20} {'chunked (samples/s)':>20} {'ratio':>6}")
    for r in rows:
        print(f"{r['device']:8} {r['chunk']:5d} {r['one_box_per_s']:20.2f} {r['chunked_per_s']:20.2f} {r['speedup']:6.2f}")


if __name__ == "__main__":
    main()
