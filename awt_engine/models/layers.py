"""Small trainable layers the methods attach to frozen towers, and how they attach.

* :class:`BottleneckAdapter`: ``x -> s * up(gelu(down(x)))`` added to a residual branch's
  output (AWT's multimodal adapter). ``up`` starts at zero, so an attached adapter
  starts as the identity and the tower as the frozen one.
* :class:`BranchAdapters`: one adapter per attention and per MLP branch of every
  residual block of a tower, attached by forward hooks on the branch-output modules the
  backbone exposes (:class:`~awt_engine.backbone.model.TowerBlocks`). The tower's own
  parameters and state dict are untouched; :meth:`BranchAdapters.disabled` runs the
  frozen tower (for regularisers towards it), :meth:`BranchAdapters.active` switches
  them on or off for one block (a method whose backbone is shared keeps them off outside
  its own calls), and :meth:`BranchAdapters.remove` restores it exactly.

Random initial values come from a ``generator`` when one is given, never from the global
RNG (the linear layers are built without their default initialisation).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BottleneckAdapter(nn.Module):
    """``s * up(gelu(down(x)))``, width d -> hidden -> d (AWT: Xavier down, zero up)."""

    def __init__(
        self,
        width: int,
        hidden: int,
        *,
        learn_scale: bool = True,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if hidden < 1 or width < 1:
            raise ValueError(f"adapter sizes must be >= 1, got width={width}, hidden={hidden}")
        # skip_init: nn.Linear's own (Kaiming) draw would advance the global RNG
        self.down = nn.utils.skip_init(nn.Linear, width, hidden)
        self.up = nn.utils.skip_init(nn.Linear, hidden, width)
        # AWT's Scale=-1: a learnable scale starting at 1 (a fixed 1 otherwise)
        self.scale = nn.Parameter(torch.ones(1), requires_grad=learn_scale)
        nn.init.xavier_uniform_(self.down.weight, generator=generator)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # starts as the identity of the branch
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.down(x.to(self.down.weight.dtype)))
        return (self.up(h) * self.scale).to(x.dtype)


class BranchAdapters(nn.Module):
    """Adapters on the attention and MLP branch of every residual block of a tower.

    ``tower``: the tower's blocks as the backbone exposes them
    (:attr:`~awt_engine.backbone.model.ClipBackbone.vision_blocks` / ``text_blocks``):
    ``.branches`` (per block, the modules whose outputs are its attention and MLP branch
    outputs) and ``.width``.
    """

    def __init__(
        self,
        tower,
        down_rate: int,
        *,
        learn_scale: bool = True,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if isinstance(down_rate, bool) or not isinstance(down_rate, int) or down_rate < 1:
            raise ValueError(f"down_rate must be a whole number >= 1, got {down_rate!r}")
        branches = tower.branches
        width = tower.width  # the real width, from the model
        hidden = max(1, width // down_rate)  # AWT: d // Down_Rate (guarded for tiny towers)
        self.width, self.hidden, self.depth = width, hidden, len(branches)
        kw = {"learn_scale": learn_scale, "generator": generator}
        self.attn = nn.ModuleList(BottleneckAdapter(width, hidden, **kw) for _ in branches)
        self.mlp = nn.ModuleList(BottleneckAdapter(width, hidden, **kw) for _ in branches)
        self.enabled = True
        self._handles = []
        for (attn_out, mlp_out), a, m in zip(branches, self.attn, self.mlp, strict=True):
            self._handles.append(attn_out.register_forward_hook(self._hook(a)))
            self._handles.append(mlp_out.register_forward_hook(self._hook(m)))

    def _hook(self, adapter: BottleneckAdapter):
        def add(module, inputs, output):
            return output + adapter(output) if self.enabled else output

        return add

    @contextmanager
    def active(self, on: bool = True) -> Iterator[None]:
        """Run the tower with (``on``) or without the adapters inside this block."""
        was, self.enabled = self.enabled, on
        try:
            yield
        finally:
            self.enabled = was

    def disabled(self):
        """Run the frozen tower inside this block."""
        return self.active(False)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
