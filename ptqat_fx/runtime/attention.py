"""A traceable ``nn.MultiheadAttention`` whose projections are plain ``nn.Linear`` layers.

``nn.MultiheadAttention`` keeps the q/k/v projections as one fused ``in_proj_weight`` used
inside ``F.multi_head_attention_forward``, so a graph sees one opaque module and no layer to
quantize. ``unfuse_attention`` replaces each instance (before tracing) by
``TracedMultiheadAttention``: the same computation written with ``q_proj``/``k_proj``/
``v_proj``/``out_proj`` Linear layers and two matmuls, which ``annotate`` marks like any other
layer. Outputs equal the original's up to float rounding. Per-output-channel weight
quantization of the split projections equals that of the fused weight (its rows are the
channels). Parameter paths change (``attn.in_proj_weight`` -> ``attn.q_proj.weight``...).
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn


def attention_bias(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    batch: int,
    heads: int,
    query_len: int,
    key_len: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The additive [batch, heads, query_len, key_len] bias of ``nn.MultiheadAttention``'s
    masks (boolean True = masked out, or float = added); runs eagerly in a traced graph."""
    bias = torch.zeros(batch, heads, query_len, key_len, dtype=dtype, device=(attn_mask if attn_mask is not None else key_padding_mask).device)
    for mask, shape in ((attn_mask, (-1, heads, query_len, key_len)), (key_padding_mask, (batch, 1, 1, key_len))):
        if mask is None:
            continue
        if mask.dim() == 2 and mask is attn_mask:
            mask = mask.expand(batch * heads, query_len, key_len)
        mask = mask.reshape(shape)
        bias = bias.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else bias + mask
    return bias


fx.wrap("attention_bias")


class TracedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``'s forward (batched inputs, no ``bias_k``/``add_zero_attn``)
    with Linear projections. Build it with ``from_float``."""

    # nn.TransformerEncoderLayer's fused eval fast path reads the fused in_proj weights; these
    # two attributes are what its eligibility check reads first, and send it to the slow path,
    # which calls this module.
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(
        self, embed_dim: int, num_heads: int, dropout: float, batch_first: bool,
        q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, out_proj: nn.Linear,
    ) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.head_dim = embed_dim // num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        # A module, not F.dropout(training=self.training): tracing would freeze the mode.
        self.attn_dropout = nn.Dropout(dropout)

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention) -> TracedMultiheadAttention:
        """An equivalent module sharing nothing with ``mha`` (parameters are copied)."""
        e = mha.embed_dim
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().split(e)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        biases = mha.in_proj_bias.detach().split(e) if mha.in_proj_bias is not None else (None, None, None)
        projections = [_linear(w, b) for w, b in zip(weights, biases)]
        out_proj = _linear(mha.out_proj.weight.detach(), None if mha.out_proj.bias is None else mha.out_proj.bias.detach())
        module = cls(e, mha.num_heads, mha.dropout, mha.batch_first, *projections, out_proj)
        return module.train(mha.training)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.batch_first:
            # One tensor for q/k/v in self-attention, so the projections share an input quantizer.
            key_is_query, value_is_key = key is query, value is key
            query = query.transpose(0, 1)
            key = query if key_is_query else key.transpose(0, 1)
            value = key if value_is_key else value.transpose(0, 1)
        batch, query_len, _ = query.shape
        key_len = key.shape[1]
        q = self._heads(self.q_proj(query), batch, query_len) * self.head_dim**-0.5
        k = self._heads(self.k_proj(key), batch, key_len)
        v = self._heads(self.v_proj(value), batch, key_len)
        scores = q @ k.transpose(-2, -1)
        if attn_mask is not None or key_padding_mask is not None:
            scores = scores + attention_bias(
                attn_mask, key_padding_mask, batch, self.num_heads, query_len, key_len, scores.dtype
            )
        weights = self.attn_dropout(scores.softmax(dim=-1))
        out = self.out_proj((weights @ v).transpose(1, 2).reshape(batch, query_len, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=1) if average_attn_weights else weights

    def _heads(self, x: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        return x.reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    # skip_init: the random initialisation (12 ViT blocks, four 768x768 layers each) would
    # only be overwritten.
    linear = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None,
                                device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def _kept_because(module: nn.MultiheadAttention) -> str | None:
    if module.bias_k is not None or module.add_zero_attn:
        return "kept: bias_k/bias_v/add_zero_attn are not supported"
    return None


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.MultiheadAttention]]:
    return [(path, m) for path, m in model.named_modules() if type(m) is nn.MultiheadAttention]


def unfuse_attention(model: nn.Module) -> dict[str, str]:
    """Replace, in place, every ``nn.MultiheadAttention`` of ``model`` by a
    ``TracedMultiheadAttention``.

    Returns module path -> what happened (``"unfused"``, or why it was kept: ``bias_k``/
    ``add_zero_attn`` have no Linear form here; such a module stays opaque and in float, and
    ``coverage`` lists its projections as float layers).
    """
    outcome: dict[str, str] = {}
    for path, module in _attention_modules(model):
        outcome[path] = _kept_because(module) or "unfused"
        if outcome[path] == "unfused":
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, TracedMultiheadAttention.from_float(module))
    return outcome


def unfused_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in which every ``nn.MultiheadAttention`` that
    ``unfuse_attention`` would replace is a ``TracedMultiheadAttention``: the same result as
    ``unfuse_attention(copy.deepcopy(model))``, but the attention weights are copied once, not
    copied whole and then split into new Linear layers. ``model`` is not changed."""
    memo: dict[int, object] = {
        id(module): TracedMultiheadAttention.from_float(module)
        for _, module in _attention_modules(model) if _kept_because(module) is None
    }
    return copy.deepcopy(model, memo)
