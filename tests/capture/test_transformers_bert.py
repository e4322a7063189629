"""A transformers 5 BertModel (small config, random init): its decorated ``**kwargs`` forward
is captured and quantized at W8A8 close to the float model."""
from __future__ import annotations

import importlib
import sys

import pytest
import torch

import ptqat_fx
from ptqat_fx.capture import AUTO_LEAVES_KEY, specialization, trace
from ptqat_fx.coverage import coverage

pytestmark = pytest.mark.slow  # importing transformers alone takes longer than the default suite allows


def _bert_classes():
    try:
        importlib.import_module("torchvision")
    except Exception:
        # A torchvision build that does not match torch breaks transformers' imports; BERT
        # needs no torchvision, so hide it instead of skipping the test.
        for name in [name for name in sys.modules if name.startswith("torchvision")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None  # type: ignore[assignment]
    transformers = pytest.importorskip("transformers")
    return transformers.BertConfig, transformers.BertModel


def _bert():
    config_class, model_class = _bert_classes()
    torch.manual_seed(0)
    config = config_class(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=32)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    return model_class(config).eval(), ids, torch.ones(2, 8, dtype=torch.long)


def test_bert_kwargs_forward_is_captured_whole():
    model, ids, mask = _bert()
    gm = trace(model, example_inputs=(ids,), example_kwargs={"attention_mask": mask}, auto_leaf=True)
    assert gm.meta[AUTO_LEAVES_KEY] == []
    assert specialization(gm).input_shapes == {"input_ids": (2, 8), "attention_mask": (2, 8)}
    with torch.no_grad():
        assert torch.equal(gm(ids, attention_mask=mask)["last_hidden_state"], model(ids, attention_mask=mask).last_hidden_state)


def test_bert_quantizes_at_w8a8_close_to_float():
    model, ids, mask = _bert()
    q = ptqat_fx.quantize(model, (ids,), example_kwargs={"attention_mask": mask},
                          config=ptqat_fx.QuantConfig(w_bits=8, a_bits=8), select=None, progress=False)
    found = coverage(q)
    assert found.layers >= 2 * 6 + 1 and found.share == 1.0  # q, k, v, out, up, down per layer + pooler
    with torch.no_grad():
        fp = model(ids, attention_mask=mask).last_hidden_state
        out = q(ids, attention_mask=mask)["last_hidden_state"]
    assert 0 < ((out - fp).norm() / (fp - fp.mean()).norm()) < 0.05
