"""Deploy latency: what the quantized model costs to run, as ratios to float in the same process.

CPU (``--device cpu``): onnxruntime latency of the FP32 ONNX export against the Q/DQ exports,
in a default ``InferenceSession`` (all graph optimizations on, so onnxruntime fuses Q/DQ into
integer kernels: QLinearConv, QGemm, ...; the table counts them). Arms: ``fp32``; ``qdq_w8a8``
(the default export: signed INT8, what TensorRT takes); ``qdq_w8a8_u8``
(``unsigned_activations=True``: UINT8 after ReLUs, onnxruntime's preferred form);
``qdq_w4a8_trt`` (``target="tensorrt"``: 4-bit weights stored as INT8 on the 4-bit grid, so
they fuse as INT8 does; the default export's INT4 weights would run as float convs). Models:
torchvision ResNet-50 (random init, 1x3x224x224) and the TinyBEVDet stand-in
(``examples/bev``, random init, one 6-camera frame). All arms of a model are timed in rounds
(one call each per round, the order rotating), so a busy machine slows them alike; median.

GPU (``--device cuda``): ResNet-50 at batch 64, 224x224: FP32 and FP16 (``.half()``), the
converted W8A8 model (``ptqat_fx.convert``: integer weights, Q/DQ simulated in float32), eager
and ``torch.compile``; and the linear-layer question: a ViT-B/16 MLP block (768 -> 3072 ->
768, 64 x 197 tokens) in FP16, converted, and converted with ``passes.integer_gemm``
(``torch._int_mm`` on the stored integers), eager and compiled. CUDA events, median.

    PYTHONPATH=. python3 bench/deploy_latency.py --device cpu --out bench/deploy_latency_cpu.json
    PYTHONPATH=. python3 bench/deploy_latency.py --device cuda --out $OUT/deploy_latency_gpu.json
    PYTHONPATH=. python3 bench/deploy_latency.py --device cpu --smoke    # seconds, small shapes
    PYTHONPATH=. python3 bench/deploy_latency.py --device cpu --suite torch --smoke   # the GPU arms, on the CPU
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import onnx
import torch
import torch.nn.functional as F
from torch import nn

import ptqat_fx
from examples.bev import bevdet
from examples.bev.train import build as build_bev
from ptqat_fx.passes.integer_gemm import integer_gemm
from tests.zoo.torchvision_zoo import load_torchvision

INTEGER_KERNELS = ("QGemm", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul")
CPU_ARMS = ("fp32", "qdq_w8a8", "qdq_w8a8_u8", "qdq_w4a8_trt")


def _quantized(model: nn.Module, inputs: tuple, w_bits: int, unsigned: bool = False) -> torch.fx.GraphModule:
    """PTQ at ``w_bits``/A8 with minmax scales (latency does not depend on the scales)."""
    config = ptqat_fx.QuantConfig(w_bits=w_bits, a_bits=8, w_observer="minmax", a_observer="minmax",
                                  unsigned_activations=unsigned)
    return ptqat_fx.quantize(model, inputs, [inputs], config, select=None, progress=False).eval()


def _session(path: str, threads: int) -> tuple[object, int]:
    """A default ``onnxruntime.InferenceSession`` (all optimizations) and how many integer
    kernels its optimized graph runs (QLinearConv, QGemm, ...: the Q/DQ groups it fused)."""
    import onnxruntime  # the CPU suite's only; the GPU machine need not have it

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.optimized_model_filepath = path.replace(".onnx", "_optimized.onnx")
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath)
    integer = sum(node.op_type.startswith("QLinear") or node.op_type in INTEGER_KERNELS for node in optimized.graph.node)
    return session, integer


def _rounds(arms: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each arm, timed in rotating rounds."""
    names = list(arms)
    for name in names:
        for _ in range(warmup):
            arms[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:
            start = time.perf_counter()
            arms[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def cpu_models(smoke: bool) -> dict[str, tuple[Callable[[], nn.Module], tuple]]:
    torchvision = load_torchvision()
    size = 64 if smoke else 224
    return {
        f"ResNet-50 1x3x{size}x{size}": (lambda: torchvision.models.resnet50(), (torch.randn(1, 3, size, size),)),
        "TinyBEVDet 1x6 cams": (lambda: build_bev("bevdet"), bevdet.example_inputs(1)),
    }


def run_cpu(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, (build, inputs) in cpu_models(args.smoke).items():
            model = build().eval()
            paths = {arm: os.path.join(folder, f"{arm}.onnx") for arm in CPU_ARMS}
            torch.onnx.export(model, inputs, paths["fp32"], dynamo=True, opset_version=21, verbose=False)
            ptqat_fx.export_onnx(_quantized(model, inputs, 8), inputs, paths["qdq_w8a8"])
            ptqat_fx.export_onnx(_quantized(model, inputs, 8, unsigned=True), inputs, paths["qdq_w8a8_u8"])
            ptqat_fx.export_onnx(_quantized(model, inputs, 4), inputs, paths["qdq_w4a8_trt"], target="tensorrt")
            opened = {arm: _session(path, args.threads) for arm, path in paths.items()}
            sessions = {arm: session for arm, (session, _) in opened.items()}
            feeds = {arm: dict(zip([i.name for i in s.get_inputs()], (t.numpy() for t in inputs)))
                     for arm, s in sessions.items()}
            arms = {arm: (lambda s=s, f=feeds[arm]: s.run(None, f)) for arm, s in sessions.items()}
            seconds = _rounds(arms, args.repeats, args.warmup)
            rows.append({"model": name, **{f"{arm}_ms": 1e3 * s for arm, s in seconds.items()},
                         **{f"{arm}_integer_kernels": count for arm, (_, count) in opened.items()},
                         **{f"{arm}_vs_fp32": s / seconds["fp32"] for arm, s in seconds.items() if arm != "fp32"}})
            print(rows[-1], flush=True)
    return rows


def _milliseconds(fn: Callable[[], object], warmup: int, steps: int, device: str) -> float:
    """Median milliseconds per call: CUDA events on the GPU, the wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    if device != "cuda":
        return 1e3 * _rounds({"arm": fn}, steps, 0)["arm"]
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class MLPBlock(nn.Module):
    """The MLP of a ViT-B/16 encoder block: most of its FLOPs are these two linears."""

    def __init__(self, dim: int = 768, hidden: int = 3072) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def _torch_arms(model: nn.Module, x: torch.Tensor, with_integer_gemm: bool) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Arm name -> (module, input) on ``x``'s device; quantized (on the CPU) with a slice of ``x``."""
    model = model.eval()
    qmodel = _quantized(model, (x[:8].cpu(),), 8)
    arms = {"fp32": (model.to(x.device), x), "fp16": (copy.deepcopy(model).half(), x.half()),
            "converted": (ptqat_fx.convert(qmodel).to(x.device), x)}
    if with_integer_gemm:
        arms["converted_int_mm"] = (integer_gemm(ptqat_fx.convert(qmodel)).to(x.device), x)
    return arms


def torch_cases(smoke: bool) -> dict[str, tuple[nn.Module, torch.Tensor, bool]]:
    """Name -> (model, input, whether to add the integer-GEMM arm); ``smoke``: small stand-ins."""
    torchvision = load_torchvision()
    if smoke:
        return {"ResNet-18 2x3x32x32 (smoke)": (torchvision.models.resnet18(), torch.randn(2, 3, 32, 32), False),
                "MLP block 2x17x64 (smoke)": (MLPBlock(64, 256), torch.randn(2, 17, 64), True)}
    return {"ResNet-50 64x3x224x224": (torchvision.models.resnet50(), torch.randn(64, 3, 224, 224), False),
            "ViT-B/16 MLP block 64x197x768": (MLPBlock(), torch.randn(64, 197, 768), True)}


def run_torch(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    rows = []
    started = time.perf_counter()
    for name, (model, x, with_int_mm) in torch_cases(args.smoke).items():
        arms = _torch_arms(model, x.to(args.device), with_int_mm)
        row: dict[str, object] = {"model": name}
        with torch.no_grad():
            for arm, (module, inputs) in arms.items():
                row[f"{arm}_eager_ms"] = _milliseconds(lambda: module(inputs), args.warmup, args.steps, args.device)
                if args.compile_arms is None or arm in args.compile_arms:
                    compiled = torch.compile(module, fullgraph=True)
                    row[f"{arm}_compiled_ms"] = _milliseconds(lambda: compiled(inputs), args.warmup, args.steps, args.device)
                print(name, arm, f"{time.perf_counter() - started:.0f}s", flush=True)
        for key in [k for k in row if k.endswith("_ms")]:
            row[key.replace("_ms", "_vs_fp32_eager")] = row[key] / row["fp32_eager_ms"]
            if "fp16_compiled_ms" in row:
                row[key.replace("_ms", "_vs_fp16_compiled")] = row[key] / row["fp16_compiled_ms"]
        rows.append(row)
    return rows


def table(rows: list[dict], suite: str) -> str:
    if suite == "onnxruntime":
        lines = ["| model | arm | ms | x FP32 | integer kernels after onnxruntime's fusion |", "|---|---|---|---|---|"]
        for r in rows:
            lines += [f"| {r['model']} | {arm} | {r[f'{arm}_ms']:.1f} | "
                      f"{r[f'{arm}_vs_fp32'] if arm != 'fp32' else 1.0:.2f} | {r[f'{arm}_integer_kernels']} |" for arm in CPU_ARMS]
        return "\n".join(lines)
    lines = ["| model | arm | eager ms | compiled ms | eager / FP32 eager | compiled / FP16 compiled |",
             "|---|---|---|---|---|---|"]
    cell = lambda r, key, form: format(r[key], form) if key in r else "-"  # noqa: E731
    for r in rows:
        for arm in [k[: -len("_eager_ms")] for k in r if k.endswith("_eager_ms")]:
            lines.append(f"| {r['model']} | {arm} | {cell(r, f'{arm}_eager_ms', '.2f')} | {cell(r, f'{arm}_compiled_ms', '.2f')} | "
                         f"{cell(r, f'{arm}_eager_vs_fp32_eager', '.2f')} | {cell(r, f'{arm}_compiled_vs_fp16_compiled', '.2f')} |")
    return "\n".join(lines)


def machine(device: str) -> dict[str, object]:
    info = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch": torch.__version__}
    if device == "cpu":
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    float32_matmul_precision=torch.get_float32_matmul_precision())
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--suite", choices=("onnxruntime", "torch"), default=None,
                        help="onnxruntime CPU exports, or the torch arms (default: onnxruntime on cpu, torch on cuda)")
    parser.add_argument("--out", default=None, help="JSON file to write")
    parser.add_argument("--smoke", action="store_true", help="small shapes and few repeats (a check that it runs)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (cpu)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed calls per GPU arm")
    parser.add_argument("--compile-arms", nargs="*", default=None,
                        help="torch suite: arms to also time under torch.compile (default: all)")
    args = parser.parse_args()
    args.repeats = args.repeats or (3 if args.smoke else 30)
    args.warmup = args.warmup or (1 if args.smoke else 5)
    args.steps = args.steps or (3 if args.smoke else 30)
    args.suite = args.suite or ("onnxruntime" if args.device == "cpu" else "torch")
    if args.suite == "onnxruntime" and args.device != "cpu":
        parser.error("the onnxruntime suite runs on the CPU (--device cpu)")
    rows = run_cpu(args) if args.suite == "onnxruntime" else run_torch(args)
    result = {"device": args.device, "machine": machine(args.device), "args": vars(args), "rows": rows}
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)
    print(table(rows, args.suite))


if __name__ == "__main__":
    main()
