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
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from awt_engine.scorers import AWTConfig
from awt_engine.transport import (
    kernel_form_is_safe,
    plan_from_scalings,
    run_steps,
    solve_scalings,
    transport_plan,
)
from awt_engine.weights import prompt_weights_from_logits, view_weights_from_logits

log = logging.getLogger(__name__)

# Cost is 1 - cosine, so it spans at most 2: the bound that picks the transport domain.
_COSINE_COST_RANGE = 2.0


@dataclass(frozen=True)
class AWTOutput:
    """Scores plus what produced them (for diagnostics and reports)."""

    scores: Tensor  # [B, C]
    view_weights: Tensor  # [B, V]
    prompt_weights: Tensor  # [B, C, P]
    iterations: Tensor  # [B] Sinkhorn iterations (0 where no transport ran)
    converged: Tensor  # [B] stopped by tolerance
    plans: Tensor | None = None  # [B, C, V, P] transport plans, when asked for (keep_plans)


# ---------------------------------------------------------------------------------------
# Similarity sources: where blocks of sim[b, v, c, p] come from.


class _EmbeddingSims:
    """Similarities from L2-normalised embeddings, computed block by block."""

    def __init__(self, image_embeds: Tensor, class_embeds: Tensor):
        self.img, self.txt = image_embeds, class_embeds  # [B,V,D], [C,P,D]
        self.B, self.V, _ = image_embeds.shape
        self.C, self.P, self.D = class_embeds.shape
        self._txt_mean = None

    def block(self, bs: slice, cs: slice) -> Tensor:
        """sim for images bs and classes cs: [G, Cc, P, V], a permuted view of one GEMM.

        Each block is logged at DEBUG level (``awt_engine.scoring``) with its shape, so
        the memory budget's effect can be checked from outside.

        One GEMM for the whole block (text rows x all views), which BLAS runs faster
        than one per image; the permutation is absorbed by the kernel's strided write.
        """
        txt = self.txt[cs]
        Cc = txt.shape[0]
        img = self.img[bs]  # [G,V,D]
        G = img.shape[0]
        flat = txt.reshape(Cc * self.P, self.D) @ img.reshape(G * self.V, self.D).T  # [Cc*P,G*V]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("similarity block %s", [G, Cc, self.P, self.V])
        return flat.view(Cc, self.P, G, self.V).permute(2, 0, 1, 3)  # [G,Cc,P,V] view

    def prompt_mean(self, bs: slice) -> Tensor:
        """mean_p sim: [G, V, C] (linear, so through the mean text embedding)."""
        if self._txt_mean is None:
            self._txt_mean = self.txt.mean(dim=1)  # [C,D]
        return torch.matmul(self.img[bs], self._txt_mean.T)

    def raw_view(self, bs: slice) -> Tensor:
        """sim of view 0: [G, C, P]."""
        img0 = self.img[bs, 0]  # [G,D]
        return torch.matmul(img0, self.txt.reshape(self.C * self.P, self.D).T).view(
            -1, self.C, self.P
        )

    def weighted_mean(self, bs: slice, u: Tensor, w: Tensor) -> Tensor:
        """sum_{v,p} u[v] w[c,p] sim[v,c,p] = <sum_v u img, sum_p w txt>: [G, C]."""
        img_bar = torch.einsum("gv,gvd->gd", u, self.img[bs])  # [G,D]
        txt_bar = torch.einsum("gcp,cpd->gcd", w, self.txt)  # [G,C,D]
        return torch.einsum("gd,gcd->gc", img_bar, txt_bar)


class _LogitSims:
    """Similarities given whole (e.g. by a generative method), [B, V, C, P]."""

    def __init__(self, sims: Tensor):
        self.sims = sims
        self.B, self.V, self.C, self.P = sims.shape

    def block(self, bs: slice, cs: slice) -> Tensor:
        return self.sims[bs, :, cs, :].permute(0, 2, 3, 1)  # [G,Cc,P,V] view

    def prompt_mean(self, bs: slice) -> Tensor:
        return self.sims[bs].mean(dim=-1)  # [G,V,C]

    def raw_view(self, bs: slice) -> Tensor:
        return self.sims[bs, 0]  # [G,C,P]

    def weighted_mean(self, bs: slice, u: Tensor, w: Tensor) -> Tensor:
        return torch.einsum("gv,gcp,gvcp->gc", u, w, self.sims[bs])


# ---------------------------------------------------------------------------------------
# Budgeting

_DEFAULT_CPU_BUDGET = 1 << 30  # 1 GiB: leaves room for the model and decoded images
# 2 GiB on CUDA, fixed: the budget decides the block sizes and whether the entropy weights
# come from the blocks, so a budget read from free memory (which moves with PyTorch's
# cache and other processes) could change rounding, and an iteration count near the
# tolerance, between identical runs. 2 GiB holds the blocks of hundreds of images even at
# ImageNet's 1000 classes x 50 prompts x 9 views (~5 MB each), more than a forward pass
# gives, and leaves the rest of an 8 GB card to the model. A card smaller than 8 GiB gets
# a quarter of its total memory (a property of the card, the same on every run).
_DEFAULT_CUDA_BUDGET = 2 << 30


def default_memory_budget(device: torch.device) -> int:
    """Bytes the transport blocks may use: 1 GiB on CPU (and MPS), 2 GiB on CUDA (a
    quarter of the card's total memory when that is less); never read from free memory,
    so identical runs cut identical blocks."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return min(_DEFAULT_CUDA_BUDGET, max(total // 4, 64 << 20))
    return _DEFAULT_CPU_BUDGET


def _tensors_per_element(log_domain: bool) -> int:
    # kernel form: sim, K and sim*K (sim is freed once sim*K exists);
    # log domain: logsumexp materialises two more temporaries of the block's size.
    return 5 if log_domain else 3


# ---------------------------------------------------------------------------------------
# The AWT engine


def check_embeddings(image_embeds: Tensor, class_embeds: Tensor) -> None:
    if not isinstance(image_embeds, Tensor) or not isinstance(class_embeds, Tensor):
        raise TypeError("image_embeds and class_embeds must be torch.Tensors")
    if image_embeds.dim() != 3:
        raise ValueError(f"image_embeds must be [B, V, D], got shape {tuple(image_embeds.shape)}")
    if class_embeds.dim() != 3:
        raise ValueError(f"class_embeds must be [C, P, D], got shape {tuple(class_embeds.shape)}")
    if image_embeds.shape[-1] != class_embeds.shape[-1]:
        raise ValueError(
            f"embedding widths differ: image_embeds D={image_embeds.shape[-1]}, "
            f"class_embeds D={class_embeds.shape[-1]}"
        )
    if image_embeds.device != class_embeds.device:
        raise ValueError(
            f"image_embeds on {image_embeds.device} but class_embeds on {class_embeds.device}"
        )
    if min(image_embeds.shape[:2]) < 1 or min(class_embeds.shape[:2]) < 1:
        raise ValueError(
            f"empty input: image_embeds {tuple(image_embeds.shape)}, "
            f"class_embeds {tuple(class_embeds.shape)}"
        )


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision embeddings (GPU backbones) are scored in float32; float64 stays.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _solve(
    src,
    scale: float,
    cfg: AWTConfig,
    *,
    weighting: str,
    transport: bool,
    memory_budget: int | None,
    sync_every: int | None,
    dtype: torch.dtype,
    device: torch.device,
    keep_plans: bool = False,
) -> AWTOutput:
    B, V, C, P = src.B, src.V, src.C, src.P
    budget = default_memory_budget(device) if memory_budget is None else int(memory_budget)
    if budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
    itemsize = torch.finfo(dtype).bits // 8
    log_domain = not kernel_form_is_safe(_COSINE_COST_RANGE, cfg.eps, dtype)

    scores = torch.empty(B, C, dtype=dtype, device=device)
    u_all = torch.empty(B, V, dtype=dtype, device=device)
    w_all = torch.empty(B, C, P, dtype=dtype, device=device)
    iters = torch.zeros(B, dtype=torch.int64, device=device)
    conv = torch.zeros(B, dtype=torch.bool, device=device)

    per_image = C * V * P * itemsize * _tensors_per_element(log_domain)
    g = budget // per_image  # images whose whole similarity block fits the budget
    # With whole blocks in memory, the entropy weights come from the block itself (view 0
    # and the prompt mean are in it); otherwise from their own small matmuls first.
    weights_from_blocks = transport and g >= 1 and weighting == "entropy"

    # Weights need O(V*C + C*P) per image: ~3 live [V, C] and ~10 live [C, P] temporaries.
    # They get a quarter of the budget: their allocations are small enough for the C heap
    # to keep resident afterwards, under the transport blocks that follow.
    per_image_w = (3 * V * C + 10 * C * P) * itemsize
    gw = max(1, budget // (4 * per_image_w))
    for b0 in range(0, B, gw) if not weights_from_blocks else ():
        bs = slice(b0, min(B, b0 + gw))
        if weighting == "entropy":
            u_all[bs], w_all[bs] = _entropy_weights(
                src.prompt_mean(bs), src.raw_view(bs), scale, cfg
            )
        else:
            assert weighting == "uniform", weighting
            u_all[bs] = 1.0 / V
            w_all[bs] = 1.0 / P

    if not transport:
        for b0 in range(0, B, gw):
            bs = slice(b0, min(B, b0 + gw))
            scores[bs] = scale * src.weighted_mean(bs, u_all[bs], w_all[bs])
        # without transport the "plan" is the product of the two weightings
        plans = u_all[:, None, :, None] * w_all[:, :, None, :] if keep_plans else None
        return AWTOutput(scores, u_all, w_all, iters, conv, plans)

    if keep_plans and g < 1:  # checked before the plans are allocated
        raise ValueError(
            f"the transport plans of one image ({C} classes x {V} views x {P} prompts) do not "
            f"fit memory_budget ({budget / 2**20:.0f} MiB); raise it to keep plans"
        )
    plans = torch.empty(B, C, V, P, dtype=dtype, device=device) if keep_plans else None
    if g >= 1:
        for b0 in range(0, B, g):
            bs = slice(b0, min(B, b0 + g))
            sim_t = src.block(bs, slice(None))  # [G,C,P,V]
            if weights_from_blocks:
                u_all[bs], w_all[bs] = _entropy_weights(
                    sim_t.mean(dim=2).transpose(1, 2), sim_t[..., 0], scale, cfg
                )
            scores[bs], iters[bs], conv[bs] = _transport_block(
                sim_t,
                u_all[bs],
                w_all[bs],
                scale,
                cfg,
                log_domain,
                sync_every,
                plan_out=plans[bs] if keep_plans else None,
            )
            del sim_t
    else:
        cc = max(1, budget // (V * P * itemsize * _tensors_per_element(log_domain)))
        for b in range(B):
            bs = slice(b, b + 1)
            scores[bs], iters[bs], conv[bs] = _transport_class_chunked(
                src, bs, u_all[bs], w_all[bs], scale, cfg, log_domain, cc
            )
    return AWTOutput(scores, u_all, w_all, iters, conv, plans)


def _entropy_weights(prompt_mean: Tensor, raw_view: Tensor, scale: float, cfg: AWTConfig):
    """(u [G,V], w [G,C,P]) from mean_p sim [G,V,C] and view 0's sim [G,C,P]."""
    return (
        view_weights_from_logits(scale * prompt_mean, cfg.view_temperature),
        prompt_weights_from_logits(scale * raw_view, cfg.prompt_temperature),
    )


def _kernel_from_sims(sim_t: Tensor, eps: float, log_domain: bool) -> Tensor:
    """K (or log K) = exp((sim - 1)/eps): a new contiguous [G, C, P, V] tensor.

    ``sim_t`` may be a permuted view; the strided read happens once, here, fused with
    the affine map (two passes over the block in all).
    """
    k = torch.empty(sim_t.shape, dtype=sim_t.dtype, device=sim_t.device)
    shift = torch.tensor(-1.0 / eps, dtype=sim_t.dtype, device=sim_t.device)
    torch.add(shift, sim_t, alpha=1.0 / eps, out=k)
    return k if log_domain else k.exp_()


def _solve_block(sim_t, u, w, cfg, log_domain, sync_every):
    """Kernel [G, C, P, V] (log K in the log domain) and Sinkhorn scalings for a block.

    sim_t: [G, C, P, V] similarities (any strides); u: [G, V]; w: [G, C, P].
    """
    G, C, _, V = sim_t.shape
    K_t = _kernel_from_sims(sim_t, cfg.eps, log_domain)  # [G,C,P,V]
    a = u.unsqueeze(1).expand(G, C, V)  # [G,C,V]
    if log_domain:
        a, w = a.log(), w.log()
    s = solve_scalings(
        K_t.transpose(-1, -2),
        a,
        w,
        log_domain=log_domain,
        tol=cfg.tol,
        max_iter=cfg.max_iter,
        sync_every=sync_every,
    )
    return K_t, s


def _plan_t(K_t: Tensor, s) -> Tensor:
    """The plan, [G, C, P, V] like the block (transport's formula on the transposed view)."""
    return plan_from_scalings(K_t.transpose(-1, -2), s).transpose(-1, -2)


def _transport_block(sim_t, u, w, scale, cfg, log_domain, sync_every, plan_out=None):
    """A block of images with all their classes: (scores [G,C], iterations [G], converged [G]).

    ``plan_out`` ([G, C, V, P]) receives the plans the scores come from, when given.
    """
    K_t, s = _solve_block(sim_t, u, w, cfg, log_domain, sync_every)
    if plan_out is not None:
        plan_out.copy_(_plan_t(K_t, s).transpose(-1, -2))
    if log_domain:
        score = (_plan_t(K_t, s) * sim_t).sum(dim=(-1, -2))
    else:
        ks_t = K_t.mul_(sim_t)  # [G,C,P,V] sim*K, in K's buffer (K is done with)
        # r^T (K.sim) g, with the product in row-vector form (see transport.sinkhorn_step)
        score = (torch.matmul(s.r.unsqueeze(-2), ks_t.mT).squeeze(-2) * s.g).sum(-1)
    return scale * score, s.iterations, s.converged


def _transport_class_chunked(src, bs, u, w, scale, cfg, log_domain, cc):
    """One image whose classes do not fit at once: solve class chunks in rounds.

    The stopping iteration depends on the error summed over *all* classes, so each
    round runs every chunk for the same iterations, recording per iteration the error
    sums and the scores; after the round the global stopping iteration is read off.
    Rounds double in length (8, 16, 32, ...), so the matmul is usually done once.
    """
    G = u.shape[0]
    assert G == 1
    C, V, P = src.C, src.V, src.P
    dtype, device = u.dtype, u.device
    fill = 0.0 if log_domain else 1.0
    r_state = torch.full((G, C, V), fill, dtype=dtype, device=device)
    g_state = torch.full((G, C, P), fill, dtype=dtype, device=device)
    a_full = u.unsqueeze(1).expand(G, C, V)
    b_full = w
    if log_domain:
        a_full, b_full = a_full.log(), b_full.log()
    log_count_tol = math.log(C * V) + math.log(cfg.tol)

    done_iter, round_len = 0, 8
    while True:
        n = min(round_len, cfg.max_iter - done_iter)
        log_err = torch.full((G, n), -math.inf, dtype=dtype, device=device)
        score_hist = torch.empty(G, n, C, dtype=dtype, device=device)
        for c0 in range(0, C, cc):
            cs = slice(c0, min(C, c0 + cc))
            sim_t = src.block(bs, cs)  # [G,Cc,P,V]
            K_t = _kernel_from_sims(sim_t, cfg.eps, log_domain)
            K = K_t.transpose(-1, -2)  # [G,Cc,V,P] view
            if not log_domain:
                sim_t = torch.mul(sim_t, K_t, out=torch.empty_like(K_t))  # sim*K, contiguous
            a, b = a_full[:, cs], b_full[:, cs]

            def record(j, r, g, cs=cs, K=K, sim_t=sim_t, hist=score_hist):
                if log_domain:
                    plan = transport_plan(K, r, g, log_domain)  # [G,Cc,V,P]
                    hist[:, j, cs] = (plan * sim_t.mT).sum(dim=(-1, -2))
                else:  # r^T (K.sim) g: sim_t holds K * sim here
                    hist[:, j, cs] = (torch.matmul(r.unsqueeze(-2), sim_t.mT).squeeze(-2) * g).sum(
                        -1
                    )

            r, g, changes = run_steps(
                K, a, b, r_state[:, cs], g_state[:, cs], n, log_domain=log_domain, after_step=record
            )
            log_err = torch.logaddexp(log_err, changes)
            r_state[:, cs], g_state[:, cs] = r, g
            del sim_t, K_t, K, record
        below = (log_err < log_count_tol)[0]  # [n]
        hit = below.nonzero()
        if hit.numel():
            j = int(hit[0])
            return (
                scale * score_hist[:, j],
                torch.tensor([done_iter + j + 1], device=device),
                torch.tensor([True], device=device),
            )
        done_iter += n
        if done_iter >= cfg.max_iter:
            return (
                scale * score_hist[:, n - 1],
                torch.tensor([cfg.max_iter], device=device),
                torch.tensor([False], device=device),
            )
        round_len *= 2


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _grad_transport(src, u, w, scale, cfg, memory_budget, sync_every, device, dtype):
    """Transport scores with gradients through the logits, weights and plan held fixed.

    Returns (scores [B, C] with a graph, iterations [B], converged [B]).
    """
    B, V, C, P = src.B, src.V, src.C, src.P
    log_domain = not kernel_form_is_safe(_COSINE_COST_RANGE, cfg.eps, dtype)
    budget = default_memory_budget(device) if memory_budget is None else int(memory_budget)
    itemsize = torch.finfo(dtype).bits // 8
    per_image = C * V * P * itemsize * (_tensors_per_element(log_domain) + 2)  # + plan, graph
    if per_image > budget:
        raise ValueError(
            f"gradients through awt_scores need one image's {C} classes x {V} views x "
            f"{P} prompts ({per_image / 2**20:.0f} MiB) within memory_budget "
            f"({budget / 2**20:.0f} MiB); raise memory_budget"
        )
    g = budget // per_image
    rows, iters, conv = [], [], []
    for b0 in range(0, B, g):
        bs = slice(b0, min(B, b0 + g))
        sim_t = src.block(bs, slice(None))  # [G,C,P,V], carries the graph
        with torch.no_grad():
            K_t, s = _solve_block(sim_t.detach(), u[bs], w[bs], cfg, log_domain, sync_every)
            plan_t = _plan_t(K_t, s)
        rows.append(scale * (plan_t * sim_t).sum(dim=(-1, -2)))
        iters.append(s.iterations)
        conv.append(s.converged)
    return torch.cat(rows), torch.cat(iters), torch.cat(conv)


def _run(*args, **kwargs):
    """The scorer in its own work dtype (float32, or float64 for float64 inputs) also
    inside a training loop's autocast: autocast would run the similarity products in
    float16 and mix dtypes inside the Sinkhorn updates."""
    device_type = args[1][0].device.type
    with torch.autocast(device_type, enabled=False):
        return _run_exact(*args, **kwargs)


def _run_exact(
    src_factory,
    tensors,
    scale,
    cfg,
    weighting,
    transport,
    memory_budget,
    sync_every,
    keep_plans=False,
):
    in_dtype = tensors[0].dtype
    dtype = _work_dtype(in_dtype)
    device = tensors[0].device
    if not (isinstance(scale, int | float) and scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    cast = [t.to(dtype) for t in tensors]
    grad = _needs_grad(*tensors)
    with torch.no_grad():
        # With gradients, the transport runs once, below, with the graph; here only weights.
        out = _solve(
            src_factory(*[t.detach() for t in cast]),
            float(scale),
            cfg,
            weighting=weighting,
            transport=transport and not grad,
            memory_budget=memory_budget,
            sync_every=sync_every,
            dtype=dtype,
            device=device,
            keep_plans=keep_plans and not grad,
        )
    if grad:
        src = src_factory(*cast)
        u, w = out.view_weights, out.prompt_weights
        if transport:
            scores, iters, conv = _grad_transport(
                src, u, w, float(scale), cfg, memory_budget, sync_every, device, dtype
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
        _EmbeddingSims,
        [image_embeds, class_embeds],
        scale,
        config or AWTConfig(),
        weighting,
        transport,
        memory_budget,
        sync_every,
        keep_plans,
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
        lambda t: _LogitSims(t / scale),
        [logits],
        scale,
        config or AWTConfig(),
        weighting,
        transport,
        memory_budget,
        None,
        keep_plans,
    )


# ---------------------------------------------------------------------------------------
# Public pieces and baselines


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
        scale * _EmbeddingSims(image_embeds, class_embeds).prompt_mean(slice(None)), temperature
    )


def prompt_weights(
    image_embeds: Tensor, class_embeds: Tensor, scale: float = 100.0, temperature: float = 0.5
) -> Tensor:
    """Entropy-based prompt weights ``w``: [B, C, P] (from view 0)."""
    check_embeddings(image_embeds, class_embeds)
    return prompt_weights_from_logits(
        scale * _EmbeddingSims(image_embeds, class_embeds).raw_view(slice(None)), temperature
    )
