"""The torchao int8 candidate of bench_cpu.py (not the engine's int8 path: docs/design.md).

``torchao_int8(model)`` splits each ``nn.MultiheadAttention`` into q, k, v and output
``nn.Linear`` (the same function, ``scaled_dot_product_attention`` in between) so that every
matmul of a block is a Linear, then quantises every Linear with torchao's
``Int8DynamicActivationInt8WeightConfig`` (int8 weights per output channel, int8
activations per token, quantised as they come).

Axes: N rows, L query tokens, S key tokens, W width, H heads.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F


class SplitAttention(torch.nn.Module):
    """``nn.MultiheadAttention``'s forward with q, k, v and out as four ``nn.Linear``."""

    def __init__(self, mha: torch.nn.MultiheadAttention) -> None:
        super().__init__()
        W = mha.embed_dim
        self.heads, self.batch_first = mha.num_heads, mha.batch_first
        bias = mha.in_proj_bias
        self.q, self.k, self.v = (torch.nn.Linear(W, W, bias=bias is not None) for _ in "qkv")
        for i, lin in enumerate((self.q, self.k, self.v)):
            lin.weight.data.copy_(mha.in_proj_weight.data[i * W : (i + 1) * W])
            if bias is not None:
                lin.bias.data.copy_(bias.data[i * W : (i + 1) * W])
        self.out_proj = torch.nn.Linear(W, W, bias=mha.out_proj.bias is not None)
        self.out_proj.load_state_dict(mha.out_proj.state_dict())
        self.requires_grad_(False)

    def forward(self, q_x, k_x, v_x, need_weights=False, attn_mask=None, **_):
        """[N, L, W] (or [L, N, W] unless ``batch_first``) -> ([N, L, W], None)."""
        if not self.batch_first:
            q_x, k_x, v_x = q_x.transpose(0, 1), k_x.transpose(0, 1), v_x.transpose(0, 1)
        N, L, W = q_x.shape
        S, H = k_x.shape[1], self.heads
        q = self.q(q_x).view(N, L, H, W // H).transpose(1, 2)  # [N, H, L, W/H]
        k = self.k(k_x).view(N, S, H, W // H).transpose(1, 2)  # [N, H, S, W/H]
        v = self.v(v_x).view(N, S, H, W // H).transpose(1, 2)
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # MHA: True = masked
            attn_mask = ~attn_mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [N, H, L, W/H]
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, W))  # [N, L, W]
        return (out if self.batch_first else out.transpose(0, 1)), None


def torchao_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Quantise a float32 CPU CLIP model in place (both towers); returns it."""
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # an import notice
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention)]
    for name, mha in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, SplitAttention(mha))
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model
