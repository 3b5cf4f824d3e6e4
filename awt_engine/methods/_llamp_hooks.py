"""LLaMP's prompts inside the frozen CLIP towers, as hooks that live for one forward.

* Text: a forward pre-hook on each of the first ``depth`` text blocks overwrites the
  context slots (columns 1..n_ctx) and the LLM slots of that block's input, so the
  tower's own mask, EOT pooling and projection run unchanged.
* Vision: visual prompts appended after the patch tokens before the ViT's pre-norm and
  replaced at the input of vision blocks 1..depth-1 (the [CLS] token stays first, so
  pooling is unchanged).

Every hook is removed when the ``with`` block ends, whatever happens. The blocks are the
backbone's (:class:`~awt_engine.backbone.model.TowerBlocks`); a block's input is
[B, L, W] when ``batch_first``, else [L, B, W].

Axes: n rows (class-prompt pairs), L context length, W text width, K LLM slots, Wv
vision width, depth the prompted layers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn


@contextmanager
def _removed_after(handles: list) -> Iterator[list]:
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


@contextmanager
def text_prompts(
    blocks: Sequence[nn.Module],
    batch_first: bool,
    ctx: Tensor,
    prompts: Tensor,
    cols: Tensor,
) -> Iterator[None]:
    """Inside this block, text block i < depth reads ``ctx[i]`` ([depth, n_ctx, W]) at
    columns 1..n_ctx of every row and ``prompts[i]`` ([depth, n, K, W]) at the LLM slot
    columns ``cols`` [n, K] (on the prompts' device)."""
    n_ctx = ctx.shape[1]
    rows = torch.arange(cols.shape[0], device=cols.device)[:, None]

    def hook(i):
        def replace(module, args, kwargs):
            x = args[0]
            x = x if batch_first else x.transpose(0, 1)
            x = x.clone()
            x[:, 1 : 1 + n_ctx] = ctx[i].to(x.dtype)
            x[rows, cols] = prompts[i].to(x.dtype)
            x = x if batch_first else x.transpose(0, 1)
            return (x, *args[1:]), kwargs

        return replace

    with _removed_after([]) as handles:
        for i in range(ctx.shape[0]):
            handles.append(blocks[i].register_forward_pre_hook(hook(i), with_kwargs=True))
        yield


@contextmanager
def visual_prompts(
    pre_norm: nn.Module, blocks: Sequence[nn.Module], batch_first: bool, vp: Tensor
) -> Iterator[None]:
    """Inside this block, the ViT carries ``vp`` [depth, n, Wv]: ``vp[0]`` appended to the
    tokens before ``pre_norm``, ``vp[i]`` replacing the last n tokens at block i's input."""
    n = vp.shape[1]

    def append(module, args):
        x = args[0]  # [B, 1 + HW, Wv] before the pre-norm
        extra = vp[0].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return (torch.cat([x, extra], dim=1), *args[1:])

    def replace(i):
        def hook(module, args, kwargs):
            x = args[0]
            if batch_first:
                new = vp[i].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :-n], new], dim=1)
            else:
                new = vp[i].to(x.dtype).unsqueeze(1).expand(-1, x.shape[1], -1)
                x = torch.cat([x[:-n], new], dim=0)
            return (x, *args[1:]), kwargs

        return hook

    with _removed_after([]) as handles:
        handles.append(pre_norm.register_forward_pre_hook(append))
        for i in range(1, vp.shape[0]):
            handles.append(blocks[i].register_forward_pre_hook(replace(i), with_kwargs=True))
        yield
