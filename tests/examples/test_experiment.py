"""The experiment harness (examples/experiment.py) on a tiny CNN: every arm runs from one PTQ
state, arms differ only in their selection, the JSON holds what the tables need, resuming skips
done cells, and the table calls differences within the spread ties. Also the Fashion-MNIST
idx reader and packer on files written here."""
from __future__ import annotations

import gzip
import hashlib
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import ptqat_fx
from examples import experiment
from examples.fashion_mnist import data as fmnist_data

BATCH, STEPS = 8, 2
BUDGET = experiment.Budget(steps=STEPS, lr=1e-3, calib_batches=1)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny convolutions on a shared 2-core machine: one thread is ~40x faster than two contending.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3),
    ).eval()


def tiny_task(seen: list | None = None) -> experiment.Task:
    """Random 8x8 images; ``seen`` collects a digest of every batch the task loss receives."""
    images, labels = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(64) % 3
    weights = tiny_cnn().state_dict()

    def build() -> nn.Module:
        model = tiny_cnn()
        model.load_state_dict(weights)
        return model

    def batches(seed: int, count: int) -> list:
        order = torch.randperm(64, generator=torch.Generator().manual_seed(seed)).repeat(count)[: count * BATCH]
        return [(images[i], labels[i]) for i in order.split(BATCH)]

    def loss(outputs: torch.Tensor, batch: tuple) -> torch.Tensor:
        if seen is not None:
            seen.append(hashlib.sha256(batch[0].numpy().tobytes()).hexdigest())
        return nn.functional.cross_entropy(outputs, batch[1])

    def evaluate(model: nn.Module) -> dict[str, float]:
        return {"accuracy": 100.0 * float((model(images).argmax(1) == labels).float().mean())}

    return experiment.Task.from_parts("tiny", (build, batches, loss, evaluate))


def test_every_arm_runs_once_from_one_ptq_state(tmp_path) -> None:
    path = tmp_path / "results.json"
    experiment.run_grid([tiny_task()], ["W4A4"], [0], BUDGET, path, log=lambda _: None)
    results = json.loads(path.read_text())
    cells = results["cells"]
    names = list(experiment.arms(0))
    assert len(names) == 3 + 4 * len(experiment.RANKINGS) == 19
    assert sorted(c["arm"] for c in cells.values()) == sorted(names)
    layer_params = sum(m.weight.numel() + m.bias.numel() for m in tiny_cnn() if isinstance(m, (nn.Conv2d, nn.Linear)))
    expected_layers = {"0.25": 1, "0.5": 2, "0.75": 3}  # floor(fraction * 4 layers), at least one
    for cell in cells.values():
        assert {"metrics", "trainable_params", "trainable_layer_params", "peak_memory_bytes", "finetune_seconds",
                "selected", "seed", "bits", "steps"} <= set(cell)
        assert 0.0 <= cell["metrics"]["accuracy"] <= 100.0 and cell["peak_memory_bytes"] is None  # CPU
        assert cell["layer_params"] == layer_params
        assert cell["ptq_scales"] == cells[experiment.cell_key("tiny", "W4A4", 0, "PTQ")]["ptq_scales"]
        if cell["arm"] == "PTQ":
            assert cell["steps"] == 0 and cell["trainable_params"] == 0 and cell["selected"] == []
            continue
        assert cell["steps"] == STEPS and cell["finetune_seconds"] > 0 and math.isfinite(cell["final_loss"])
        if cell["arm"] == "full QAT":
            assert cell["trainable_layer_params"] == layer_params and len(cell["selected"]) == 4
        else:
            assert len(cell["selected"]) == expected_layers[cell["arm"].split()[1]]
    for key in experiment.RANKINGS:
        small = set(cells[experiment.cell_key("tiny", "W4A4", 0, f"small 0.5 {key}")]["selected"])
        large = set(cells[experiment.cell_key("tiny", "W4A4", 0, f"large 0.5 {key}")]["selected"])
        assert not small & large and len(small | large) == 4
    assert results["fp"]["tiny"]["accuracy"] == tiny_task().evaluate(tiny_cnn())["accuracy"]


def test_arms_differ_only_in_their_selection() -> None:
    seen: list[str] = []
    task = tiny_task(seen)
    budget = experiment.Budget(steps=STEPS, lr=1e-3, calib_batches=1, objective="task")
    state = experiment.prepare(task, "W4A8", 0, budget)
    chosen = {name: experiment.arms(0)[name] for name in ("full QAT", "small 0.5 local.euclidean", "random 0.5")}
    starts = [experiment.arm_model(state, select).state_dict() for select in chosen.values()]
    for start in starts[1:]:
        for name, value in starts[0].items():
            if name.endswith(".scale") or name.endswith(".weight") or name.endswith(".bias"):
                assert torch.equal(value, start[name]), name
    orders = []
    for select in chosen.values():
        seen.clear()
        record = experiment.run_arm(task, state, select, budget, 0, curve_every=1)
        orders.append(list(seen))
        assert [step for step, _ in record["curve"]] == [1, 2]
    expected = [hashlib.sha256(x.numpy().tobytes()).hexdigest() for x, _ in task.make_train_batches(0, 1 + STEPS)[1:]]
    assert orders == [expected] * 3
    other = experiment.prepare(task, "W4A8", 1, budget)
    assert not torch.equal(other.train_batches[0][0], state.train_batches[0][0])  # a seed changes the data order


def test_rerun_skips_done_cells_and_refuses_another_budget(tmp_path) -> None:
    path, only = tmp_path / "results.json", ["PTQ", "small 0.5 accumulated.relative"]
    experiment.run_grid([tiny_task()], ["W4A8"], [0], BUDGET, path, only=only, log=lambda _: None)
    before = path.read_text()
    calls = []
    task = tiny_task()
    task.evaluate, evaluate = (lambda model: calls.append(1) or evaluate(model)), task.evaluate
    experiment.run_grid([task], ["W4A8"], [0], BUDGET, path, only=only, log=lambda _: None)
    assert calls == [] and path.read_text() == before
    with pytest.raises(ValueError, match="budget"):
        experiment.run_grid([task], ["W4A8"], [0], experiment.Budget(steps=3), path, log=lambda _: None)


def test_table_calls_differences_within_the_spread_ties() -> None:
    assert experiment.verdict([91.5, 92.5, 91.0], [90.0, 91.0, 92.0]).startswith("tie")  # +0.67 < sd 1.0
    assert experiment.verdict([85.0, 86.0, 87.0], [90.0, 91.0, 92.0]).startswith("worse")
    assert experiment.verdict([93.5, 94.0, 94.5], [90.0, 91.0, 92.0]).startswith("better")
    assert experiment.verdict([93.0], [90.0]) == "n<2"
    arm_values = {"full QAT": [90.0, 91.0, 92.0], "small 0.5 accumulated.relative": [91.5, 92.5, 91.0], "PTQ": [60.0, 61.0, 59.0]}
    cells = {
        experiment.cell_key("m", "W3A3", seed, arm): {
            "task": "m", "bits": "W3A3", "seed": seed, "arm": arm, "metrics": {"accuracy": values[seed]},
            "trainable_layer_params": 100 if arm == "full QAT" else 10, "peak_memory_bytes": 2**20, "finetune_seconds": 1.0,
        } for arm, values in arm_values.items() for seed in range(3)
    }
    results = {"budget": {}, "fp": {"m": {"accuracy": 92.4}}, "cells": cells,
               "grid": {"m": {"metric": "accuracy", "bits": ["W3A3"], "seeds": [0, 1, 2]}}}
    rows = {line.split(" | ")[0].lstrip("| "): line for line in experiment.table(results).splitlines() if line.startswith("| ")}
    assert "| 91.67 ± 0.76 (3/3) | tie (+0.667) | better (+31.7) | 10 (10.0%) | 1 | 1.0 |" in rows["small 0.5 accumulated.relative"]
    # Arms the task never ran at any bit setting (outside its arm set) get no row.
    assert "large 0.5 accumulated.relative" not in rows and "random 0.5" not in rows
    cells[experiment.cell_key("m", "W4A8", 0, "random 0.5")] = {**cells[experiment.cell_key("m", "W3A3", 0, "PTQ")], "arm": "random 0.5", "bits": "W4A8"}
    w3a3 = experiment.table(results).split("#### m W3A3")[1]
    assert "| random 0.5 | not run |" in w3a3


def test_core_arm_set_keeps_the_sweep_to_the_default_ranking() -> None:
    core, every = experiment.arms(0, arm_set="core"), experiment.arms(0)
    assert len(core) == 13 and len(every) == 19 and set(core) < set(every)
    sweep = [name for name in core if " 0.25 " in name or " 0.75 " in name]
    assert sweep == ["small 0.25 accumulated.relative", "small 0.75 accumulated.relative"]
    with pytest.raises(ValueError, match="arm set"):
        experiment.arms(0, arm_set="some")


def test_fashion_mnist_reader_and_packer(tmp_path) -> None:
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), "train_labels": np.arange(5, dtype=np.uint8),
              "test_images": rng.integers(0, 256, (2, 28, 28), dtype=np.uint8), "test_labels": np.arange(2, dtype=np.uint8)}
    for split, prefix in fmnist_data.SPLITS.items():
        for kind, magic in (("images", 2051), ("labels", 2049)):
            array = arrays[f"{split}_{kind}"]
            header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
            dims = "idx3" if kind == "images" else "idx1"
            with gzip.open(tmp_path / f"{prefix}-{kind}-{dims}-ubyte.gz", "wb") as handle:
                handle.write(header + array.tobytes())
    packed = fmnist_data.pack(tmp_path / "packed" / "fm.npz", tmp_path)
    for source in (tmp_path, packed):
        loaded = fmnist_data.load(source)
        assert set(loaded) == set(arrays) and all(np.array_equal(loaded[k], arrays[k]) for k in arrays)
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + bytes(8)))
    with pytest.raises(ValueError, match="bad.gz"):
        fmnist_data.read_idx(tmp_path / "bad.gz")


def test_merge_joins_parallel_runs_and_refuses_another_budget(tmp_path) -> None:
    only = ["PTQ"]
    parts = []
    for seed in (0, 1):
        path = tmp_path / f"part{seed}.json"
        parts.append(experiment.run_grid([tiny_task()], ["W4A8"], [seed], BUDGET, path, only=only, log=lambda _: None))
    merged = experiment.merge_results(json.loads(json.dumps(parts[0])), parts[1])
    assert set(merged["cells"]) == set(parts[0]["cells"]) | set(parts[1]["cells"]) and len(merged["cells"]) == 2
    assert merged["grid"]["tiny"]["seeds"] == [0, 1]
    other = experiment.run_grid([tiny_task()], ["W4A8"], [0], experiment.Budget(steps=1), tmp_path / "other.json",
                                only=only, log=lambda _: None)
    with pytest.raises(ValueError, match="budget"):
        experiment.merge_results(merged, other)
