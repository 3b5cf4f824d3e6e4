"""The AWT scorer: view/prompt entropy weights and optimal transport, batched and exact.

From image-view embeddings ``[B, V, D]`` and class-prompt embeddings ``[C, P, D]``
(or precomputed similarities ``[B, V, C, P]``) to class scores ``[B, C]``, exactly as
docs/design.md section 2 defines them. This module knows nothing of CLIP.

Axes::

    B images   V views (view 0 = the un-augmented image)
    C classes  P prompts (prompt 0 = the bare template)   D embedding width

Memory: the similarity tensor ``[B, V, C, P]`` is never built whole. Work is cut
into blocks of images (and, when one image's classes exceed the budget, of classes)
that fit ``memory_budget`` bytes; the cut never changes a result, because every
quantity is per image and the Sinkhorn stopping rule, which couples all classes of
an image, is evaluated over all of its classes even when they are solved in chunks.
The budget bounds these transient blocks; the outputs (scores [B, C] and prompt
weights [B, C, P]) and the allocator's slack come on top.

The package, by job: :mod:`~awt_engine.scoring.config` (what is asked and returned),
:mod:`~awt_engine.scoring.sources` (where similarity blocks come from),
:mod:`~awt_engine.scoring.memory` (the memory plan), :mod:`~awt_engine.scoring.solvers`
(weights and Sinkhorn per block), :mod:`~awt_engine.scoring.public` (the calls below).
"""

from __future__ import annotations

import importlib

# Public names -> the module that defines them, imported on first use: naming an
# AWTConfig (the scorer registry, the CLI's usage checks) never imports torch.
_LAZY = {
    "AWTConfig": "config",
    "AWTOutput": "config",
    "_DEFAULT_CPU_BUDGET": "memory",
    "_DEFAULT_CUDA_BUDGET": "memory",
    "default_memory_budget": "memory",
    "awt_scores": "public",
    "awt_scores_from_logits": "public",
    "awt_solve": "public",
    "prompt_weights": "public",
    "similarities": "public",
    "view_weights": "public",
    "check_embeddings": "sources",
}
_SUBMODULES = ("config", "memory", "public", "solvers", "sources")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
