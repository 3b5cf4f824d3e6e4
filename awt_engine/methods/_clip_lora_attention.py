"""CLIP-LoRA's training-time attention: the LoRA branch reads a dropped-out input.

The official ``LinearLoRA`` (``loralib/layers.py``) computes, for x in q, k, v,
``x W_x^T + b_x + scale * dropout(x) A_x^T B_x^T``: the frozen projection sees the whole
input, only the low-rank branch sees it dropped (p = 0.25). A weight parametrisation
(:class:`FusedQVLoRA`, used at evaluation, where dropout is off and the two agree)
cannot drop the branch's input, so in training each adapted attention's forward is
replaced, for one forward, by :func:`lora_attention`: the same self-attention as
``nn.MultiheadAttention`` (additive or boolean mask, no key padding) with the branch
added to the fused projection.

Axes: B batch, L tokens, H heads, E head width, W width (H * E), K adapted blocks, r rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from awt_engine.models.lora import FusedQVLoRA


def lora_attention(
    attn: nn.MultiheadAttention,
    lora: FusedQVLoRA,
    p: float,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    need_weights: bool = False,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    **_: object,
) -> tuple[Tensor, None]:
    """Self-attention of ``attn`` on ``query`` ([B, L, W] if batch_first else [L, B, W])
    with the LoRA branch on dropout(query); returns (output, None) as the module does."""
    if not (query is key and key is value) or key_padding_mask is not None or need_weights:
        raise ValueError("clip-lora's training attention is self-attention without padding masks")
    x = query if attn.batch_first else query.transpose(0, 1)  # [B, L, W]
    B, L, W = x.shape
    H = attn.num_heads
    E = W // H
    proj = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # [B, L, 3W]
    xd = F.dropout(x, p, training=True).to(lora.lora_a.dtype)
    low = torch.einsum("blw,krw->kblr", xd, lora.lora_a)  # [K, B, L, r]
    branch = torch.einsum("kblr,kor->kblo", low, lora.lora_b) * lora.scale  # [K, B, L, W]
    parts = list(proj.split(W, dim=-1))  # q, k, v: [B, L, W] each
    for k, blk in enumerate(lora.blocks):
        parts[blk] = parts[blk] + branch[k].to(proj.dtype)
    q, k_, v = (t.view(B, L, H, E).transpose(1, 2) for t in parts)  # [B, H, L, E]
    mask = attn_mask
    if mask is not None:
        if mask.dtype == torch.bool:  # nn.MultiheadAttention: True = may not attend
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                mask, float("-inf")
            )
        mask = mask.to(q.dtype)
        if mask.dim() == 3:  # [B*H, L, L]
            mask = mask.view(B, H, L, L)
    drop = attn.dropout if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k_, v, attn_mask=mask, dropout_p=drop)
    out = attn.out_proj(out.transpose(1, 2).reshape(B, L, W))  # [B, L, W]
    return (out if attn.batch_first else out.transpose(0, 1)), None


@contextmanager
def dropout_lora_attached(
    pairs: Sequence[tuple[nn.MultiheadAttention, FusedQVLoRA]], p: float
) -> Iterator[None]:
    """Each ``(attention, lora)`` of ``pairs`` runs :func:`lora_attention` inside this
    block; the module's own forward back afterwards whatever happens."""
    done = []
    try:
        for attn, lora in pairs:
            attn.forward = partial(lora_attention, attn, lora, p)
            done.append(attn)
        yield
    finally:
        for attn in done:
            del attn.forward
