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
    """A torch.ao FX LSQ QAT copy of ``model`` (W``w_bits`` A``a_bits``), observers on."""
    activation = _LearnableFakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver, quant_min=-(2 ** (a_bits - 1)), quant_max=2 ** (a_bits - 1) - 1,
        dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, scale=1.0, zero_point=0.0, use_grad_scaling=True,
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
    with torch.no_grad():
        prepared(*example_inputs)
    return prepared
