"""The baseline users reach for today: torch.ao FX QAT with LSQ fake-quantizers.

``prepare_torch_ao_lsq`` builds it the documented way (``prepare_qat_fx`` with
``_LearnableFakeQuantize``: weights per channel, symmetric; activations per tensor) so
benchmarks can put our numbers beside it.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.ao.quantization import QConfig, QConfigMapping
from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize
from torch.ao.quantization.observer import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver
from torch.ao.quantization.quantize_fx import prepare_qat_fx


def prepare_torch_ao_lsq(model: nn.Module, example_inputs: tuple, w_bits: int = 4, a_bits: int = 8) -> nn.Module:
    """A torch.ao FX LSQ QAT copy of ``model`` (W``w_bits`` A``a_bits``), observers on.

    Raises ``RuntimeError`` if torch.ao inserted no activation quantizer (then the baseline
    would not be the QAT it claims to be)."""
    # quint8 activations: the native backend config matches only those, and silently leaves
    # activations in float with qint8.
    activation = _LearnableFakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=2**a_bits - 1,
        dtype=torch.quint8, qscheme=torch.per_tensor_affine, scale=1.0, zero_point=0.0, use_grad_scaling=True,
    )
    weight = _LearnableFakeQuantize.with_args(
        observer=MovingAveragePerChannelMinMaxObserver, quant_min=-(2 ** (w_bits - 1)), quant_max=2 ** (w_bits - 1) - 1,
        dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0, scale=1.0, zero_point=0.0,
        use_grad_scaling=True,
    )
    mapping = QConfigMapping().set_global(QConfig(activation=activation, weight=weight))
    prepared = prepare_qat_fx(model.train(), mapping, example_inputs)
    # _LearnableFakeQuantize holds one step per channel only if told the channel count.
    for module in prepared.modules():
        fake_quant = getattr(module, "weight_fake_quant", None)
        if isinstance(fake_quant, _LearnableFakeQuantize):
            channels = module.weight.shape[0]
            fake_quant.scale = nn.Parameter(torch.ones(channels, device=module.weight.device))
            fake_quant.zero_point = nn.Parameter(torch.zeros(channels, device=module.weight.device))
    activations = [m for name, m in prepared.named_modules()
                   if isinstance(m, _LearnableFakeQuantize) and not name.endswith("weight_fake_quant")]
    if not activations:
        raise RuntimeError("torch.ao inserted no activation fake-quantizer")
    with torch.no_grad():
        prepared(*example_inputs)
    return prepared
