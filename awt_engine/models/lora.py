"""LoRA, the one low-rank adapter of frozen weights that the methods use (LLaMP, CLAMP,
CLIP-LoRA).

A frozen weight ``W`` [out, in] becomes ``W + (alpha / r) * B @ A`` with ``A`` [r, in]
Kaiming-uniform (``a = sqrt(5)``, peft's init) and ``B`` [out, r] zero, so an adapted
model starts as the frozen one. Two attachments of the same update, because the frozen
layers come in two shapes:

* separate ``nn.Linear`` projections (a causal LM's ``q_proj`` / ``v_proj``): peft's own
  ``LoraLayer`` (:func:`inject_lora`, :func:`reset_lora`, :func:`lora_state_name`), with
  its dropout;
* a fused ``in_proj_weight`` [3W, W] (open_clip's ``nn.MultiheadAttention``), whose q, k
  and v row blocks peft cannot target separately: :class:`FusedQVLoRA` (q and v for LLaMP,
  all three for CLIP-LoRA), a
  ``torch.nn.utils.parametrize`` parametrisation (no dropout: it rewrites the weight, not
  the layer's input) registered only for the duration of a forward
  (:func:`fused_lora_attached`), so the frozen model is never left modified.

Initial values come from the caller's ``generator``, never the global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def lora_init_a(shape: Sequence[int], generator: torch.Generator) -> Tensor:
    """A LoRA ``A`` [r, in]: Kaiming-uniform with ``a = sqrt(5)`` (peft's and nn.Linear's)."""
    return nn.init.kaiming_uniform_(torch.empty(*shape), a=math.sqrt(5), generator=generator)


class FusedQVLoRA(nn.Module):
    """Low-rank updates of row blocks of a fused ``in_proj_weight`` [3W, W] (open_clip's
    attention): q and v by default (``blocks`` (0, 2)), zero for the others; a
    ``torch.nn.utils.parametrize`` parametrisation. ``B`` starts at zero, so the attention
    starts unchanged (peft's init for ``A``). The update is scaled by ``alpha / rank``
    unless ``scale`` is given (CLIP-LoRA: ``alpha / sqrt(rank)``)."""

    def __init__(
        self,
        width: int,
        rank: int,
        alpha: float,
        generator: torch.Generator,
        *,
        blocks: Sequence[int] = (0, 2),
        scale: float | None = None,
    ):
        super().__init__()
        self.width = width
        self.scale = alpha / rank if scale is None else scale
        self.blocks = tuple(int(b) for b in blocks)
        if not self.blocks or sorted(set(self.blocks)) != list(self.blocks):
            raise ValueError(f"blocks must be increasing indices of q, k, v, got {blocks!r}")
        if not all(0 <= b < 3 for b in self.blocks):
            raise ValueError(f"blocks must be in 0..2 (q, k, v), got {blocks!r}")
        K = len(self.blocks)
        a = torch.empty(K, rank, width)
        for i in range(K):
            nn.init.kaiming_uniform_(a[i], a=math.sqrt(5), generator=generator)
        self.lora_a = nn.Parameter(a)  # [K, r, W]: one per adapted block
        self.lora_b = nn.Parameter(torch.zeros(K, width, rank))  # [K, W, r]

    def forward(self, weight: Tensor) -> Tensor:
        delta = (self.lora_b @ self.lora_a * self.scale).to(weight.dtype)  # [K, W, W]
        rows = [torch.zeros_like(delta[0])] * 3
        for k, b in enumerate(self.blocks):
            rows[b] = delta[k]
        return weight + torch.cat(rows)  # [3W, W]


def has_fused_qkv(attn: nn.Module) -> bool:
    """Whether ``attn`` has a fused q/k/v ``in_proj_weight`` [3W, W] that
    :class:`FusedQVLoRA` can adapt."""
    w = getattr(attn, "in_proj_weight", None)
    return w is not None and w.shape[0] == 3 * w.shape[1]


@contextmanager
def fused_lora_attached(pairs: Sequence[tuple[nn.Module, FusedQVLoRA]]) -> Iterator[None]:
    """Each ``(attention, lora)`` of ``pairs`` adapts that attention's ``in_proj_weight``
    inside this block; removed afterwards whatever happens (the frozen weight untouched)."""
    from torch.nn.utils import parametrize

    done = []
    try:
        for attn, lora in pairs:
            parametrize.register_parametrization(attn, "in_proj_weight", lora, unsafe=True)
            done.append(attn)
        yield
    finally:
        for attn in done:
            parametrize.remove_parametrizations(attn, "in_proj_weight", leave_parametrized=False)


def inject_lora(
    model: nn.Module, rank: int, alpha: float, dropout: float, targets, *, name: str = ""
) -> nn.Module:
    """peft's LoRA on the ``nn.Linear`` modules named ``targets`` (last name part) of
    ``model``: only the LoRA matrices learn, kept in float32 under a half model (peft's
    ``autocast_adapter_dtype``). ValueError naming targets the model (called ``name``)
    does not have."""
    import peft

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ValueError(
            f"lora_targets {', '.join(missing)} are not modules of {name!r} "
            f"({type(model).__name__}); its attention projections are named otherwise"
        )
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, bias="none"
    )
    model = peft.inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():  # the model and its head stay frozen
        learned = ".lora_A." in name or ".lora_B." in name
        p.requires_grad_(learned)
        if learned:
            p.data = p.data.float()
    return model


def reset_lora(model: nn.Module, generator: torch.Generator) -> None:
    """Every peft LoRA layer of ``model`` back to its start, in module-name order: ``A``
    from ``generator`` (:func:`lora_init_a`), ``B`` zero."""
    with torch.no_grad():
        for _, module in sorted(model.named_modules(), key=lambda t: t[0]):
            if "default" in getattr(module, "lora_A", {}):
                a = module.lora_A["default"].weight
                a.copy_(lora_init_a(a.shape, generator))
                module.lora_B["default"].weight.zero_()


def lora_state_name(name: str, prefix: str) -> str:
    """peft's ``<prefix>.<path>.lora_A.default.weight`` -> ``lora.<path>.lora_A.weight``
    (the name a checkpoint keeps, free of peft's adapter name); other names unchanged."""
    if name.startswith(prefix + "."):
        return "lora." + name.removeprefix(prefix + ".").replace(".default.", ".")
    return name
