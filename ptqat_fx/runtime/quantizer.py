"""The LSQ fake-quantizer: learned step size, straight-through rounding, symmetric ranges.

``FakeQuantizer`` is the one runtime module the passes insert, for weights (per output
channel) and activations (per tensor). It moves through two modes: ``observe`` (pass the
input through unchanged and let a ``RangeObserver`` record its range) and ``quantize``
(fake-quantize with a learnable step size).

The arithmetic is one ``autograd.Function`` rather than a chain of differentiable ops so
that training keeps only the input for backward (the chain ``x / s -> clamp -> round -> * s``
would keep three more tensors of the input's size); the clip mask and the step-size
gradient are recomputed from it. When the step size is frozen, only a one-byte mask is kept.
On CUDA its forward and its backward are one fused Triton kernel each (``lsq_kernels``);
elsewhere the pure-torch reference (``lsq_arithmetic``). Either is tensor code with no host
synchronisation, so it runs under autocast.

Under ``torch.compile``, where torch 2.11 computes wrong gradients for inputs of a custom
``autograd.Function`` (pytorch/pytorch#180642: every weight's gradient came out zero), CUDA
tensors take the ``torch.library`` custom op of the same kernels, which the compiler keeps as
one opaque node and which divides exactly as eager does; other devices take differentiable
tensor ops (``lsq_fake_quantize_ops``), which the compiler fuses and whose saved tensors it
chooses itself.
"""
from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

import torch
from torch import fx, nn

from . import lsq_kernels
from .lsq_arithmetic import broadcast_scale, fake_quantize_backward, fake_quantize_forward, lsq_grad_scale
from .observer import RangeObserver

# Re-exported: the arithmetic is the quantizer's, wherever it is written.
__all__ = [
    "FROZEN_WEIGHT", "FakeQuantizer", "QuantizerMode", "broadcast_scale", "fake_quantize_backward", "finish_calibrations",
    "fake_quantize_forward", "is_quantizer_node", "lsq_fake_quantize", "lsq_fake_quantize_ops", "lsq_grad_scale",
    "quant_range", "quantizers", "step_sizes",
]

# The buffer of a frozen layer's constant dequantized weight on its weight quantizer.
FROZEN_WEIGHT = "frozen_weight"


class QuantizerMode(str, Enum):
    """``observe``: pass through and record ranges; ``quantize``: fake-quantize. A ``str`` so
    that files and reprs keep the plain names."""

    OBSERVE = "observe"
    QUANTIZE = "quantize"

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a symmetric quantizer: [-2^(b-1), 2^(b-1)-1] or [0, 2^b-1]."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


class _LSQFunction(torch.autograd.Function):
    """Fake quantization with the LSQ gradients; keeps ``x`` for backward, or, for a frozen
    step, only the one-byte clip mask unless ``save_input`` says ``x`` is kept anyway."""

    @staticmethod
    def forward(ctx, x, scale, qmin, qmax, channel_axis, grad_scale, save_input):
        ctx.qmin, ctx.qmax, ctx.channel_axis, ctx.grad_scale = qmin, qmax, channel_axis, grad_scale
        ctx.saved_input = ctx.needs_input_grad[1] or save_input
        # The mask only where backward will need it: not in inference or calibration.
        with_mask = ctx.needs_input_grad[0] and not ctx.saved_input
        out, inside = lsq_kernels.forward_pass(x, scale, qmin, qmax, channel_axis, with_mask)
        ctx.save_for_backward(*((x, scale) if ctx.saved_input else (inside,)))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.saved_input:
            (inside,) = ctx.saved_tensors
            return grad_out * inside, None, None, None, None, None, None
        x, scale = ctx.saved_tensors
        grad_x, grad_step = lsq_kernels.backward_pass(
            x, scale, grad_out, ctx.qmin, ctx.qmax, ctx.channel_axis, ctx.grad_scale, ctx.needs_input_grad[1]
        )
        return grad_x, grad_step, None, None, None, None, None


def lsq_fake_quantize_ops(
    x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, channel_axis: int | None = None
) -> torch.Tensor:
    """``lsq_fake_quantize`` as differentiable tensor ops, for compiled code: the output is
    bit-identical to ``fake_quantize_forward`` and the gradients are LSQ's.

    The value is the detached fake-quantized tensor plus ``y - y.detach()`` (exactly zero),
    where ``y = v * s + (round(v) - v).detach() * s`` with ``v = clamp(x / s)`` carries the
    gradients: 1 for ``x`` inside the range, 0 outside; ``round(v) - v`` for the step inside
    and the clip bound outside, scaled by ``grad_scale`` through ``s``."""
    grad_scale = lsq_grad_scale(x, scale, qmax)
    detached = scale.detach()
    # Value exactly ``scale``; gradient scaled by LSQ's 1 / sqrt(N * qmax).
    step = broadcast_scale(((scale - detached) * grad_scale + detached).float(), x.dim(), channel_axis)
    scaled = (x.float() / step).clamp(qmin, qmax)
    carrier = scaled * step + (scaled.round() - scaled).detach() * step
    quantized = fake_quantize_forward(x, scale, qmin, qmax, channel_axis)
    return quantized + (carrier - carrier.detach()).to(x.dtype)


def lsq_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    qmin: int,
    qmax: int,
    channel_axis: int | None = None,
    save_input: bool = False,
) -> torch.Tensor:
    """Fake-quantize ``x`` with step ``scale`` (one per tensor, or one per slice along
    ``channel_axis``); the step-size gradient is scaled by ``1 / sqrt(N * qmax)`` with N the
    number of elements sharing one step, as LSQ prescribes. With a frozen step, backward
    keeps a one-byte clip mask, or ``x`` itself if ``save_input`` (free when the op that
    made ``x`` keeps it anyway, as a ReLU keeps its output)."""
    if torch.compiler.is_compiling():
        if lsq_kernels.applies(x):
            return lsq_kernels.lsq_fake_quantize(x, scale, qmin, qmax, channel_axis, save_input)
        return lsq_fake_quantize_ops(x, scale, qmin, qmax, channel_axis)
    # Eager code takes the autograd.Function on every device (its passes run the kernels on
    # CUDA): the custom op's dispatch costs about twice its host time per call.
    return _LSQFunction.apply(x, scale, qmin, qmax, channel_axis, lsq_grad_scale(x, scale, qmax), save_input)


class FakeQuantizer(nn.Module):
    """Symmetric uniform fake-quantizer with an LSQ step size.

    Args:
        bits: 2..8.
        signed: signed range [-2^(b-1), 2^(b-1)-1], else unsigned [0, 2^b-1]; zero point 0.
        channel_axis: one step per slice along this axis (weights: 0 for conv/linear, 1 for
            transposed conv), else one step for the whole tensor.
        channels: number of steps when ``channel_axis`` is set.
        observer: how calibration sets the initial step (see ``RangeObserver``).
        percentile: for the percentile observer.
        device: where the step size lives (the layer's device, so calibration moves nothing).
    """

    def __init__(
        self,
        bits: int,
        signed: bool = True,
        channel_axis: int | None = None,
        channels: int = 1,
        observer: str = "mse",
        percentile: float = 99.99,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.bits = bits
        self.signed = signed
        self.channel_axis = channel_axis
        self.qmin, self.qmax = quant_range(bits, signed)
        self.scale = nn.Parameter(torch.ones(channels if channel_axis is not None else 1, device=device))
        self.mode = QuantizerMode.OBSERVE
        self.observer = RangeObserver(observer, self.qmax, channel_axis, percentile)
        # Set by the freeze rewrite where the input is kept for backward by its producer.
        self.save_input = False

    @property
    def mode(self) -> QuantizerMode:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        # Validates names read back from a file (``serialization.load``).
        self._mode = QuantizerMode(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._mode is QuantizerMode.OBSERVE:
            self.observer.update(x)
            return x
        return lsq_fake_quantize(x, self.scale, self.qmin, self.qmax, self.channel_axis, self.save_input)

    def _empty_observer(self) -> RangeObserver:
        return RangeObserver(self.observer.method, self.qmax, self.channel_axis, self.observer.percentile)

    def observe(self) -> None:
        """Start (again) collecting ranges; the output is the unquantized input."""
        self.observer = self._empty_observer()
        self.mode = QuantizerMode.OBSERVE

    def finish_calibration(self, clip: torch.Tensor | None = None) -> None:
        """Set the step size from what the observer saw and start fake-quantizing;
        ``clip``: a per-channel clip already found for it (``finish_calibrations``). The
        observer's statistics are dropped: a weight observer holds a float copy of its whole
        weight, which would otherwise stay on the model's device through training."""
        with torch.no_grad():
            self.scale.copy_(self.observer.scale(clip).to(self.scale.device))
        self.observer = self._empty_observer()
        self.mode = QuantizerMode.QUANTIZE

    @property
    def calibrated(self) -> bool:
        return self._mode is QuantizerMode.QUANTIZE

    def extra_repr(self) -> str:
        granularity = "per-tensor" if self.channel_axis is None else f"per-channel(axis={self.channel_axis})"
        sign = "signed" if self.signed else "unsigned"
        return f"bits={self.bits}, {sign}, {granularity}, mode={self.mode}"


def finish_calibrations(all_quantizers: Iterable[FakeQuantizer]) -> None:
    """``finish_calibration`` of each quantizer, the per-channel clips of one observer rule
    found together (``ClipRule.channel_clips``: the MSE search batches small weights); the
    same steps as one by one. A quantizer listed twice is finished once."""
    unique = list({id(q): q for q in all_quantizers}.values())
    by_rule: dict[type, list[FakeQuantizer]] = {}
    for quantizer in unique:
        if quantizer.channel_axis is None:
            quantizer.finish_calibration()
        else:
            by_rule.setdefault(type(quantizer.observer.rule), []).append(quantizer)
    for members in by_rule.values():
        clips = members[0].observer.rule.channel_clips([q.observer for q in members])
        for quantizer, clip in zip(members, clips):
            quantizer.finish_calibration(clip)


def quantizers(gm: nn.Module) -> dict[str, FakeQuantizer]:
    """Every FakeQuantizer of ``gm`` by module path."""
    return {name: m for name, m in gm.named_modules() if isinstance(m, FakeQuantizer)}


def step_sizes(module: nn.Module) -> dict[int, nn.Parameter]:
    """Every FakeQuantizer step size of ``module``, by ``id``: a parameter is a step size by
    identity, whatever its name."""
    return {id(q.scale): q.scale for q in quantizers(module).values()}


def is_quantizer_node(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` calls one of ``gm``'s FakeQuantizers."""
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), FakeQuantizer)
