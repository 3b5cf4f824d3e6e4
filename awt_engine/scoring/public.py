"""The public AWT calls: from embeddings (:func:`awt_solve`, :func:`awt_scores`) or from
logits (:func:`awt_scores_from_logits`), and the pieces (similarities, view and prompt
weights) on their own.

Every call builds one :class:`_Request` and :func:`_run` serves it: inputs cast to the
work dtype, autocast off, the solve without autograd, and with gradients the transport
once more with the graph (weights and plan held fixed).

Axes::

    B images   V views (view 0 = the un-augmented image)
    C classes  P prompts (prompt 0 = the bare template)   D embedding width
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from awt_engine.scoring.config import AWTConfig, AWTOutput
from awt_engine.scoring.memory import work_dtype
from awt_engine.scoring.solvers import grad_transport, needs_grad, solve
from awt_engine.scoring.sources import EmbeddingSims, LogitSims, check_embeddings
from awt_engine.weights import prompt_weights_from_logits, view_weights_from_logits


@dataclass(frozen=True)
class _Request:
    """One AWT computation: ``make_source(*tensors)`` gives its similarity source."""

    make_source: Callable[..., EmbeddingSims | LogitSims]
    tensors: tuple[Tensor, ...]  # (image_embeds, class_embeds) or (logits,)
    scale: float
    config: AWTConfig
    weighting: str  # "entropy" or "uniform"
    transport: bool
    memory_budget: int | None
    sync_every: int | None
    keep_plans: bool


def _run(req: _Request) -> AWTOutput:
    """The request in its own work dtype (float32, or float64 for float64 inputs) also
    inside a training loop's autocast: autocast would run the similarity products in
    float16 and mix dtypes inside the Sinkhorn updates."""
    with torch.autocast(req.tensors[0].device.type, enabled=False):
        return _run_exact(req)


def _run_exact(req: _Request) -> AWTOutput:
    in_dtype = req.tensors[0].dtype
    dtype = work_dtype(in_dtype)
    device = req.tensors[0].device
    scale, cfg = req.scale, req.config
    if not (isinstance(scale, int | float) and scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    cast = [t.to(dtype) for t in req.tensors]
    grad = needs_grad(*req.tensors)
    with torch.no_grad():
        # With gradients, the transport runs once, below, with the graph; here only weights.
        out = solve(
            req.make_source(*[t.detach() for t in cast]),
            float(scale),
            cfg,
            weighting=req.weighting,
            transport=req.transport and not grad,
            memory_budget=req.memory_budget,
            sync_every=req.sync_every,
            dtype=dtype,
            device=device,
            keep_plans=req.keep_plans and not grad,
        )
    if grad:
        src = req.make_source(*cast)
        u, w = out.view_weights, out.prompt_weights
        if req.transport:
            scores, iters, conv = grad_transport(
                src, u, w, float(scale), cfg, req.memory_budget, req.sync_every, device, dtype
            )
        else:
            scores, iters, conv = (
                float(scale) * src.weighted_mean(slice(None), u, w),
                out.iterations,
                out.converged,
            )
        out = AWTOutput(scores, u, w, iters, conv)
    if in_dtype != dtype:
        out = AWTOutput(
            out.scores.to(in_dtype),
            out.view_weights,
            out.prompt_weights,
            out.iterations,
            out.converged,
            out.plans,
        )
    return out


def awt_solve(
    image_embeds: Tensor,
    class_embeds: Tensor,
    scale: float = 100.0,
    *,
    config: AWTConfig | None = None,
    weighting: str = "entropy",
    transport: bool = True,
    memory_budget: int | None = None,
    sync_every: int | None = None,
    keep_plans: bool = False,
) -> AWTOutput:
    """AWT from embeddings, returning scores with the weights and iteration counts.

    ``weighting="uniform"`` and ``transport=False`` give the paper's ablations.
    ``keep_plans`` also returns the transport plans the scores come from ([B, C, V, P]:
    small problems only; the explanations of :mod:`awt_engine.explain` use them).
    """
    check_embeddings(image_embeds, class_embeds)
    if weighting not in ("entropy", "uniform"):
        raise ValueError(f"weighting must be 'entropy' or 'uniform', got {weighting!r}")
    return _run(
        _Request(
            make_source=EmbeddingSims,
            tensors=(image_embeds, class_embeds),
            scale=scale,
            config=config or AWTConfig(),
            weighting=weighting,
            transport=transport,
            memory_budget=memory_budget,
            sync_every=sync_every,
            keep_plans=keep_plans,
        )
    )


def awt_scores(
    image_embeds: Tensor,
    class_embeds: Tensor,
    scale: float = 100.0,
    *,
    eps: float = 0.1,
    view_temperature: float = 0.5,
    prompt_temperature: float = 0.5,
    tol: float = 1e-2,
    max_iter: int = 100,
    memory_budget: int | None = None,
    sync_every: int | None = None,
) -> Tensor:
    """AWT class scores (docs/design.md section 2).

    image_embeds: [B, V, D] L2-normalised, view 0 the un-augmented image.
    class_embeds: [C, P, D] L2-normalised, prompt 0 the bare template.
    scale: multiplier on cosine similarity (CLIP's ``logit_scale.exp()``).
    memory_budget: bytes the transport blocks may use (default: 1 GiB on CPU, 2 GiB on
    CUDA: :func:`default_memory_budget`); results do not depend on it beyond rounding.
    Returns [B, C] in the inputs' dtype and device. Gradients, when the inputs require
    them, flow through the logits with weights and plan held fixed.
    """
    cfg = AWTConfig(eps, view_temperature, prompt_temperature, tol, max_iter)
    return awt_solve(
        image_embeds,
        class_embeds,
        scale,
        config=cfg,
        memory_budget=memory_budget,
        sync_every=sync_every,
    ).scores


def awt_scores_from_logits(
    logits: Tensor,
    scale: float = 100.0,
    *,
    config: AWTConfig | None = None,
    weighting: str = "entropy",
    transport: bool = True,
    memory_budget: int | None = None,
    keep_plans: bool = False,
) -> AWTOutput:
    """AWT from view-class-prompt logits ``[B, V, C, P]`` (= scale * similarity).

    For methods that produce logits directly (generative ones); the transport cost is
    ``1 - logits / scale``.
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be [B, V, C, P], got shape {tuple(logits.shape)}")
    if weighting not in ("entropy", "uniform"):
        raise ValueError(f"weighting must be 'entropy' or 'uniform', got {weighting!r}")
    return _run(
        _Request(
            make_source=lambda t: LogitSims(t / scale),
            tensors=(logits,),
            scale=scale,
            config=config or AWTConfig(),
            weighting=weighting,
            transport=transport,
            memory_budget=memory_budget,
            sync_every=None,
            keep_plans=keep_plans,
        )
    )


def similarities(image_embeds: Tensor, class_embeds: Tensor) -> Tensor:
    """The full ``sim[b, v, c, p]`` tensor (small inputs only): [B, V, C, P]."""
    check_embeddings(image_embeds, class_embeds)
    return torch.einsum("bvd,cpd->bvcp", image_embeds, class_embeds)


def view_weights(
    image_embeds: Tensor, class_embeds: Tensor, scale: float = 100.0, temperature: float = 0.5
) -> Tensor:
    """Entropy-based view weights ``u``: [B, V]."""
    check_embeddings(image_embeds, class_embeds)
    return view_weights_from_logits(
        scale * EmbeddingSims(image_embeds, class_embeds).prompt_mean(slice(None)), temperature
    )


def prompt_weights(
    image_embeds: Tensor, class_embeds: Tensor, scale: float = 100.0, temperature: float = 0.5
) -> Tensor:
    """Entropy-based prompt weights ``w``: [B, C, P] (from view 0)."""
    check_embeddings(image_embeds, class_embeds)
    return prompt_weights_from_logits(
        scale * EmbeddingSims(image_embeds, class_embeds).raw_view(slice(None)), temperature
    )
