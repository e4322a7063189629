"""``ptqat-fx``: quantize a model from the command line, print its report, write HTML and dumps.

    ptqat-fx demo                                   # a bundled ResNet, W4A8, report printed
    ptqat-fx analyze examples.resnet_small:build --input-shape 16,3,32,32 --html report.html
    ptqat-fx dump examples.vit_small:build --input-shape 8,1,28,28 --dir dumps/

Bad arguments end with exit status 2 and one line on stderr; errors raised by the pipeline
(a model that does not trace, bad calibration data) with status 1.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from typing import Any
from pathlib import Path

import torch
from torch import fx, nn

from .api import quantize
from .config import QuantConfig, Select
from .strategies import STRATEGIES
from .views.dump.stages import StageDumper, stage_names
from .errors import PTQATError
from .meta import bits_label
from .passes.convert import convert
from .views.report import report

_DEMO_FACTORY, _DEMO_SHAPE = "ptqat_fx.demo_models.resnet_small:build", "16,3,32,32"
_EPILOG = """examples:
  ptqat-fx demo
  ptqat-fx analyze examples.resnet_small:build --input-shape 16,3,32,32 --html report.html
  ptqat-fx analyze mypackage.models:make_net --input-shape 8,3,224,224 --data calib.pt --w-bits 8
  ptqat-fx dump examples.vit_small:build --input-shape 8,1,28,28 --dir dumps/

MODULE:FACTORY names a function (or class) that takes no arguments and returns the
nn.Module to quantize; MODULE is imported from the current directory or the installed
packages. Without --data the model is calibrated on random normal inputs."""


class UsageError(Exception):
    """A command-line argument is unusable; the message says which and what to write."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that points to ``--help``."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,32,32"`` -> ``(1, 3, 32, 32)``; every dimension a positive integer."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"--input-shape {text!r}: write positive integers separated by commas, e.g. 1,3,32,32")
    return shape


def _import_from_cwd_or_path(module_name: str) -> Any:
    """Import ``module_name``, finding its top-level package in the working directory first
    (as ``python -m`` would) without putting that directory on ``sys.path``."""
    top = module_name.partition(".")[0]
    if top not in sys.modules:
        spec = importlib.machinery.PathFinder.find_spec(top, [str(Path.cwd())])
        if spec is not None and spec.loader is not None:
            module = importlib.util.module_from_spec(spec)
            sys.modules[top] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[top]
                raise
    return importlib.import_module(module_name)


def load_factory(spec: str) -> nn.Module:
    """Import ``MODULE:FACTORY`` and call the factory; the result must be an nn.Module."""
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise UsageError(f"{spec!r}: write MODULE:FACTORY, e.g. examples.resnet_small:build")
    try:
        module = _import_from_cwd_or_path(module_name)
    except ImportError as error:
        raise UsageError(
            f"cannot import module {module_name!r} ({error}); run from the folder that holds it or install it"
        ) from error
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise UsageError(f"module {module_name!r} has no callable {attribute!r}; name a function that returns the model")
    model = factory()
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec} returned {type(model).__name__}, not an nn.Module")
    return model.eval()


def calibration_batches(shape: tuple[int, ...], data: Path | None, batches: int) -> list[torch.Tensor]:
    """Batches from ``data`` (a saved tensor split along dim 0, or a list of tensors), else
    ``batches`` random normal batches of ``shape``."""
    if data is None:
        generator = torch.Generator().manual_seed(0)
        return [torch.randn(shape, generator=generator) for _ in range(batches)]
    if not data.is_file():
        raise UsageError(f"--data {str(data)!r}: no such file; save a tensor or a list of tensors with torch.save")
    try:
        loaded = torch.load(data, weights_only=True)
    except Exception as error:  # torch.load raises many kinds on a foreign or damaged file
        raise UsageError(
            f"--data {str(data)!r}: not readable by torch.load ({type(error).__name__}); "
            "save the inputs with torch.save"
        ) from error
    if isinstance(loaded, torch.Tensor):
        return list(loaded.split(shape[0]))
    if isinstance(loaded, (list, tuple)) and loaded and all(isinstance(t, torch.Tensor) for t in loaded):
        return list(loaded)
    raise UsageError(f"--data {str(data)!r}: holds {type(loaded).__name__}; save a tensor or a list of tensors")


def _quantize(
    args: argparse.Namespace, dump_dir: Path | None = None
) -> tuple[nn.Module, fx.GraphModule, list[torch.Tensor]]:
    config, select = _settings(args)  # validated before the model is built or anything printed
    model = load_factory(args.factory)
    shape = parse_shape(args.input_shape)
    data = calibration_batches(shape, args.data, args.batches)
    qmodel = quantize(model, (data[0],), data, config, select, dump_dir=dump_dir)
    return model, qmodel, data


def _settings(args: argparse.Namespace) -> tuple[QuantConfig, Select]:
    """The config and selection the arguments ask for; raises ConfigError on bad ones."""
    return QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits), Select(strategy=args.strategy, fraction=args.fraction)


def _print_report(model: nn.Module, qmodel: fx.GraphModule, sample: torch.Tensor, html: Path | None) -> None:
    summary = report(qmodel)
    print(summary)
    with torch.no_grad():
        reference, quantized = model(sample), qmodel(sample)
    if isinstance(reference, torch.Tensor):
        error = float((quantized - reference).norm() / reference.norm())
        print(f"FP vs quantized output on the first batch: relative error {error:.4f}")
    if html is not None:
        summary.save_html(html, title=f"ptqat-fx report: {type(model).__name__}")
        print(f"HTML report: {html}")


def _analyze(args: argparse.Namespace) -> None:
    model, qmodel, data = _quantize(args)
    _print_report(model, qmodel, data[0], args.html)


def _demo(args: argparse.Namespace) -> None:
    _settings(args)  # a bad --w-bits fails here, before the header names it
    print(f"demo: {_DEMO_FACTORY}, input {_DEMO_SHAPE}, {bits_label(args.w_bits, args.a_bits)}, random calibration data")
    _analyze(args)


def _dump(args: argparse.Namespace) -> None:
    _, qmodel, _ = _quantize(args, dump_dir=args.dir)
    StageDumper(args.dir, first=len(stage_names(args.dir)) + 1)("converted", convert(qmodel))
    for name in stage_names(args.dir):
        print(args.dir / name, "(.txt .json .dot .svg)")


def _command(
    commands: argparse._SubParsersAction, name: str, parent: argparse.ArgumentParser, summary: str
) -> argparse.ArgumentParser:
    return commands.add_parser(name, parents=[parent], help=summary, description=summary[0].upper() + summary[1:] + ".")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ptqat-fx",
        description="PTQAT quantization for PyTorch models: quantize with PTQ calibration, measure\n"
        "each layer's quantization error, pick the layers to fine-tune, and show it all.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--w-bits", type=int, default=4, help="weight bits, 2..8 (default 4)")
    options.add_argument("--a-bits", type=int, default=8, help="activation bits, 2..8 (default 8)")
    options.add_argument(
        "--strategy", default="small", choices=STRATEGIES,
        help="which layers to fine-tune: small (PTQAT, default), large, random, all, none",
    )
    options.add_argument("--fraction", type=float, default=0.5, help="share of layers to select (default 0.5)")
    model = argparse.ArgumentParser(add_help=False, parents=[options])
    model.add_argument("factory", metavar="MODULE:FACTORY", help="function returning the model, e.g. examples.resnet_small:build")
    model.add_argument("--input-shape", required=True, help="shape of one input batch, e.g. 16,3,32,32")
    model.add_argument(
        "--data", type=Path,
        help="calibration inputs saved with torch.save: a tensor (split into batches) or a list of batches",
    )
    model.add_argument("--batches", type=int, default=4, help="random calibration batches when --data is not given (default 4)")
    demo = _command(commands, "demo", options, "quantize a bundled ResNet end to end and print its report")
    demo.add_argument("--html", type=Path, help="also write the HTML report here")
    demo.set_defaults(run=_demo, factory=_DEMO_FACTORY, input_shape=_DEMO_SHAPE, data=None, batches=4)
    analyze = _command(commands, "analyze", model, "quantize a model, print the per-layer table, write the HTML report")
    analyze.add_argument("--html", type=Path, help="write the HTML report here")
    analyze.set_defaults(run=_analyze)
    dump = _command(commands, "dump", model, "write the graph after every pipeline stage (txt, json, dot, svg)")
    dump.add_argument("--dir", type=Path, required=True, help="folder for the numbered stages as written: 01_traced.* to 08_frozen.*, then 09_converted.*")
    dump.set_defaults(run=_dump)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ptqat-fx``; returns (and, as a console script, exits with) the status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except UsageError as error:
        print(f"ptqat-fx: error: {error}", file=sys.stderr)
        return 2
    except PTQATError as error:
        print(f"ptqat-fx: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
