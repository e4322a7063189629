"""DDP check: ``finetune`` under torchrun gives what one process gives on the same global batch.

Every rank quantizes the same seeded ResNet-50 (PTQAT W4A8, small 0.5) and fine-tunes it by
distillation with SGD on its shard of each global batch (``finetune`` wraps the model in
DistributedDataParallel). Rank 0 keeps a copy of the model from before training; after the
process group is gone, it fine-tunes that copy alone on the whole global batches and compares
the trainable parameters and the losses. TF32 is off so that the two differ only by float32
summation order. Writes JSON.

    torchrun --nproc_per_node 2 bench/ddp_check.py --out ddp_check.json          # 2 GPUs, NCCL
    torchrun --nproc_per_node 2 bench/ddp_check.py --device cpu --tiny           # gloo smoke run
"""
from __future__ import annotations

import argparse
import copy
import json
import os

import torch
import torch.distributed as dist

import ptqat_fx
from tests.zoo.torchvision_zoo import load_torchvision


def _sgd(groups: list[dict]) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=1e-3, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default="bench/ddp_check.json")
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = args.device == "cuda"
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group("nccl" if cuda else "gloo")
    size, batch = (32, 4) if args.tiny else (224, args.global_batch)
    torch.manual_seed(0)
    teacher = load_torchvision().models.resnet50(num_classes=10 if args.tiny else 1000).eval()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(batch, 3, size, size, generator=generator) for _ in range(args.steps)]
    calib = [b[:8] for b in batches[:2]]
    # quantize() fails on CUDA models (fold_bn and new quantizers create CPU tensors): quantize on the CPU.
    qmodel = ptqat_fx.quantize(teacher, (calib[0],), calib, ptqat_fx.QuantConfig(w_bits=4, a_bits=8),
                               ptqat_fx.Select("small", fraction=0.5), progress=False).to(device)
    teacher, batches = teacher.to(device), [b.to(device) for b in batches]
    reference = copy.deepcopy(qmodel)
    shard = batch // world
    shards = [b[rank * shard:(rank + 1) * shard] for b in batches]
    ddp = ptqat_fx.finetune(qmodel, shards, teacher=teacher, optimizer=_sgd, device=device, progress=False)
    losses = [torch.zeros(len(ddp.loss), device=device) for _ in range(world)]
    dist.all_gather(losses, torch.tensor(ddp.loss, device=device))
    dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        return
    single = ptqat_fx.finetune(reference, batches, teacher=teacher, optimizer=_sgd, device=device, progress=False)
    trained, alone = dict(qmodel.named_parameters()), dict(reference.named_parameters())
    worst = {"name": None, "relative": 0.0}
    for name, parameter in alone.items():
        if parameter.requires_grad:
            relative = ((trained[name] - parameter).norm() / parameter.norm().clamp_min(1e-12)).item()
            if relative > worst["relative"]:
                worst = {"name": name, "relative": relative}
    frozen_equal = all(torch.equal(trained[n], p) for n, p in alone.items() if not p.requires_grad)
    mean_rank_loss = torch.stack(losses).mean(0).tolist()
    loss_relative = max(abs(a - b) / abs(b) for a, b in zip(mean_rank_loss, single.loss))
    result = {
        "world_size": world, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "global_batch": batch, "steps": args.steps,
        "trainable_params": sum(p.numel() for p in alone.values() if p.requires_grad),
        "worst_param_relative_diff": worst, "frozen_bit_identical": frozen_equal,
        "loss_single": single.loss, "loss_ddp_rank_mean": mean_rank_loss, "loss_max_relative_diff": loss_relative,
        "ddp_seconds": ddp.seconds, "single_seconds": single.seconds,
        "ddp_peak_bytes_rank0": ddp.peak_memory_bytes, "single_peak_bytes": single.peak_memory_bytes,
        "match": frozen_equal and worst["relative"] < 1e-4 and loss_relative < 1e-4,
    }
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
