"""The AWT solvers: entropy weights, then per block of images the Sinkhorn transport and
the scores it gives (docs/design.md section 2), within a :mod:`memory plan
<awt_engine.scoring.memory>`.

Every function here takes a similarity source (:mod:`awt_engine.scoring.sources`) and
works in one dtype; :mod:`awt_engine.scoring.public` casts, checks and turns autocast off.

Axes::

    B images (G of them in a block)   V views   C classes (Cc in a chunk)   P prompts
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from awt_engine.scoring.config import AWTConfig, AWTOutput
from awt_engine.scoring.memory import grad_images_per_block, memory_plan, resolve_budget
from awt_engine.transport import plan_from_scalings, run_steps, solve_scalings, transport_plan
from awt_engine.weights import prompt_weights_from_logits, view_weights_from_logits


def solve(
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
    """AWT over every image of ``src`` in ``dtype`` (no autograd): scores [B, C], view
    weights [B, V], prompt weights [B, C, P], iterations and convergence [B], and the
    plans [B, C, V, P] when ``keep_plans``."""
    B, V, C, P = src.B, src.V, src.C, src.P
    budget = resolve_budget(memory_budget, device)
    plan = memory_plan(V, C, P, cfg.eps, dtype, budget)
    log_domain = plan.log_domain
    per_block, per_weight_block = plan.images_per_block, plan.images_per_weight_block

    scores = torch.empty(B, C, dtype=dtype, device=device)
    u_all = torch.empty(B, V, dtype=dtype, device=device)
    w_all = torch.empty(B, C, P, dtype=dtype, device=device)
    iters = torch.zeros(B, dtype=torch.int64, device=device)
    conv = torch.zeros(B, dtype=torch.bool, device=device)

    # With whole blocks in memory, the entropy weights come from the block itself (view 0
    # and the prompt mean are in it); otherwise from their own small matmuls first.
    weights_from_blocks = transport and per_block >= 1 and weighting == "entropy"
    if not weights_from_blocks:
        _fill_weights(src, u_all, w_all, weighting, scale, cfg, per_weight_block)

    if not transport:
        for b0 in range(0, B, per_weight_block):
            bs = slice(b0, min(B, b0 + per_weight_block))
            scores[bs] = scale * src.weighted_mean(bs, u_all[bs], w_all[bs])
        # without transport the "plan" is the product of the two weightings
        plans = u_all[:, None, :, None] * w_all[:, :, None, :] if keep_plans else None
        return AWTOutput(scores, u_all, w_all, iters, conv, plans)

    if keep_plans and per_block < 1:  # checked before the plans are allocated
        raise ValueError(
            f"the transport plans of one image ({C} classes x {V} views x {P} prompts) do not "
            f"fit memory_budget ({budget / 2**20:.0f} MiB); raise it to keep plans"
        )
    plans = torch.empty(B, C, V, P, dtype=dtype, device=device) if keep_plans else None
    out = AWTOutput(scores, u_all, w_all, iters, conv, plans)
    if per_block >= 1:
        _transport_blocks(src, out, scale, cfg, plan, sync_every, weights_from_blocks)
    else:
        for b in range(B):
            bs = slice(b, b + 1)
            scores[bs], iters[bs], conv[bs] = _transport_class_chunked(
                src, bs, u_all[bs], w_all[bs], scale, cfg, log_domain, plan.classes_per_chunk
            )
    return out


def _fill_weights(src, u_all, w_all, weighting, scale, cfg, per_weight_block) -> None:
    """Entropy (or uniform) weights into u_all [B, V] and w_all [B, C, P], in blocks."""
    B, V, P = src.B, src.V, src.P
    for b0 in range(0, B, per_weight_block):
        bs = slice(b0, min(B, b0 + per_weight_block))
        if weighting == "entropy":
            u_all[bs], w_all[bs] = _entropy_weights(
                src.prompt_mean(bs), src.raw_view(bs), scale, cfg
            )
        else:
            assert weighting == "uniform", weighting
            u_all[bs] = 1.0 / V
            w_all[bs] = 1.0 / P


def _transport_blocks(src, out: AWTOutput, scale, cfg, plan, sync_every, weights_from_blocks):
    """Transport block by block of ``plan.images_per_block`` images, into ``out``'s
    tensors (and its weights too when ``weights_from_blocks``)."""
    u_all, w_all, plans = out.view_weights, out.prompt_weights, out.plans
    for b0 in range(0, src.B, plan.images_per_block):
        bs = slice(b0, min(src.B, b0 + plan.images_per_block))
        sim_t = src.block(bs, slice(None))  # [G,C,P,V]
        if weights_from_blocks:
            u_all[bs], w_all[bs] = _entropy_weights(
                sim_t.mean(dim=2).transpose(1, 2), sim_t[..., 0], scale, cfg
            )
        out.scores[bs], out.iterations[bs], out.converged[bs] = _transport_block(
            sim_t,
            u_all[bs],
            w_all[bs],
            scale,
            cfg,
            plan.log_domain,
            sync_every,
            plan_out=plans[bs] if plans is not None else None,
        )
        del sim_t


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


def needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def grad_transport(src, u, w, scale, cfg, memory_budget, sync_every, device, dtype):
    """Transport scores with gradients through the logits, weights and plan held fixed.

    Returns (scores [B, C] with a graph, iterations [B], converged [B]).
    """
    B, V, C, P = src.B, src.V, src.C, src.P
    budget = resolve_budget(memory_budget, device)
    per_block, log_domain = grad_images_per_block(V, C, P, cfg.eps, dtype, budget)
    rows, iters, conv = [], [], []
    for b0 in range(0, B, per_block):
        bs = slice(b0, min(B, b0 + per_block))
        sim_t = src.block(bs, slice(None))  # [G,C,P,V], carries the graph
        with torch.no_grad():
            K_t, s = _solve_block(sim_t.detach(), u[bs], w[bs], cfg, log_domain, sync_every)
            plan_t = _plan_t(K_t, s)
        rows.append(scale * (plan_t * sim_t).sum(dim=(-1, -2)))
        iters.append(s.iterations)
        conv.append(s.converged)
    return torch.cat(rows), torch.cat(iters), torch.cat(conv)
