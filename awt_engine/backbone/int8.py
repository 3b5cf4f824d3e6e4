"""int8 on the CPU: the frozen towers' Linear layers quantised with torchao.

``load_backbone(..., precision="int8")`` builds the model in float32, then
:func:`quantise_towers` first replaces each ``nn.MultiheadAttention`` by a
:class:`SplitAttention` holding the same weights as Linear layers (q, k, v and the output
projection; the same function, ``scaled_dot_product_attention`` in between), then replaces
the weight of every ``nn.Linear`` in both towers (those four, the MLPs' ``c_fc`` and
``c_proj``) by an int8 tensor with one scale per output row, each activation row quantised
on the fly (torchao's ``Int8DynamicActivationInt8WeightConfig``: symmetric int8 weights per
channel, int8 activations per token). So every matmul of a block runs in int8; the patch
embedding, norms, the attention's softmax(QK^T)V and the projections stored as bare
parameters stay float32. Why torchao and not ONNX Runtime's quantised graph or OpenVINO:
docs/design.md (measured side by side in ``benchmarks/bench_cpu.py``).

The modules stay the model's own (only their weights change type), so forward hooks on the
token embedding or a block, as CoOp, LAMM and CLAMP place them in front of the frozen towers,
act as in float32. A method that changes a tower's inside (adapters on its branches, LoRA on
its weights) declares ``int8_refusal`` and is refused on an int8 backbone
(:func:`check_int8_method`).

Axes: N rows (images or texts), L query tokens, S key tokens, W tower width, H heads,
E head width (W / H).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
import torch.nn.functional as F

INSTALL_HINT = "int8 needs torchao: pip install 'awt-engine[int8]' (or: uv sync --extra int8)"


@contextmanager
def _quiet_torch_log(name: str):
    """torchao's import registers an enum that torch 2.13's pytree logs a deprecation
    notice for, once per process: not the user's concern."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def torchao_quantization():
    """``torchao.quantization``, imported lazily (ImportError with the install hint)."""
    try:
        with _quiet_torch_log("torch.utils._pytree"):
            from torchao import quantization
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    return quantization


class SplitAttention(torch.nn.Module):
    """``nn.MultiheadAttention``'s forward (self- or cross-attention, an optional additive or
    boolean ``attn_mask``, no key padding mask, no weights returned) with q, k, v and the output
    projection as four ``nn.Linear``, so a weight-quantising library sees them."""

    def __init__(self, mha: torch.nn.MultiheadAttention) -> None:
        super().__init__()
        W = mha.embed_dim
        self.heads, self.batch_first = mha.num_heads, mha.batch_first
        if mha.in_proj_weight is None or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("only open_clip's fused-projection attention can be split")
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
        q = self.q(q_x).view(N, L, H, W // H).transpose(1, 2)  # [N, H, L, E]
        k = self.k(k_x).view(N, S, H, W // H).transpose(1, 2)  # [N, H, S, E]
        v = self.v(v_x).view(N, S, H, W // H).transpose(1, 2)  # [N, H, S, E]
        if attn_mask is not None and attn_mask.dim() == 3:  # [N*H, L, S] -> [N, H, L, S]
            attn_mask = attn_mask.view(N, H, L, S)
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # MHA: True = masked out
            attn_mask = ~attn_mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [N, H, L, E]
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, W))  # [N, L, W]
        return (out if self.batch_first else out.transpose(0, 1)), None


def split_attention(model: torch.nn.Module) -> int:
    """Replace, in place, every ``nn.MultiheadAttention`` under ``model`` by a
    :class:`SplitAttention` with its weights; returns how many."""
    found = [
        (name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention)
    ]
    for name, mha in found:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, SplitAttention(mha))
    return len(found)


def _tower_linear(module: torch.nn.Module, fqn: str) -> bool:
    """Quantise every Linear with a float weight (the filter torchao calls per module)."""
    weight = getattr(module, "weight", None)
    return isinstance(module, torch.nn.Linear) and type(weight) is torch.nn.Parameter


def quantise_towers(model: torch.nn.Module) -> int:
    """Quantise, in place, the Linear layers of a float32 CLIP model on the CPU (both towers:
    everything under the model). Returns how many Linear layers were quantised.

    Raises ValueError on a model that is not float32 on the CPU (int8 is a CPU path).
    """
    params = list(model.parameters())
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
        raise ValueError("int8 quantisation expects a float32 model on the CPU")
    split_attention(model)
    n = sum(1 for name, m in model.named_modules() if _tower_linear(m, name))
    if n == 0:
        raise ValueError("the model has no Linear layers to quantise")
    q = torchao_quantization()
    q.quantize_(model, q.Int8DynamicActivationInt8WeightConfig(), filter_fn=_tower_linear)
    return n


def check_int8_method(method: str, reason: str, precision: str | None) -> None:
    """Refuse a method that changes a tower's inside (``reason``, its own words) on an int8
    backbone: its learned parts act on the weights or branches int8 replaces."""
    if precision == "int8" and reason:
        raise ValueError(
            f"{method} cannot run at precision int8: {reason}; int8 quantises the frozen "
            "towers' Linear layers, so use fp32 (or fp16/bf16 on a GPU)"
        )


__all__ = [
    "INSTALL_HINT",
    "SplitAttention",
    "check_int8_method",
    "quantise_towers",
    "split_attention",
    "torchao_quantization",
]
