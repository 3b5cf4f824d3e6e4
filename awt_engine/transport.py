"""Batched entropic optimal transport (Sinkhorn), with the AWT stopping rule.

Problem, solver and result are kept apart: :func:`sinkhorn` takes a cost and two
marginals and returns a :class:`SinkhornResult` carrying the plan, the scalings,
the iteration count and a ``converged`` flag per batch element.

Axes, everywhere in this module::

    B  batch (images)      -- the stopping rule is decided per b
    C  independent problems sharing b's stopping rule (classes)
    V  rows   (views)
    P  columns (prompts)

Iteration (from r = 1, g = 1)::

    r <- a / (K g)        g <- b / (K^T r)        K = exp(-cost / eps)

Element b stops once ``mean_{c,v} |r - r_prev| < tol`` or after ``max_iter``
iterations; its scalings are then frozen, so a result never depends on what else
shared the batch. For small eps the same fixed point is computed in the log domain
(log r, log g, log K) so nothing under- or overflows.

No ``torch.no_grad`` is hard-wired here: callers decide (AWT holds the plan fixed
and lets gradients flow through the logits only).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# Fraction of the dtype's exponent range the kernel form may use. With cosine costs
# (range <= 2) and eps = 0.1 the kernel spans exp(-20): far from float32's exp(-87)
# floor. Below this margin the log domain is used instead.
_KERNEL_RANGE_FRACTION = 0.35


def kernel_form_is_safe(cost_range: float, eps: float, dtype: torch.dtype) -> bool:
    """Whether ``exp(-cost / eps)`` and the scalings stay well inside ``dtype``'s range.

    ``cost_range`` bounds ``max(cost) - min(cost)`` (2 for ``1 - cosine``). A static
    bound, so the choice of domain never depends on which data shared a batch.
    """
    return cost_range / eps <= _KERNEL_RANGE_FRACTION * -math.log(torch.finfo(dtype).tiny)


@dataclass(frozen=True)
class Scalings:
    """Sinkhorn scalings (linear, or their logarithms when ``log_domain``)."""

    r: Tensor  # [B, C, V]
    g: Tensor  # [B, C, P]
    log_domain: bool
    iterations: Tensor  # [B] int64, iterations run for each element
    converged: Tensor  # [B] bool, stopped by the tolerance rather than max_iter
    error: Tensor  # [B] mean |r - r_prev| at the last iteration (inf when it overflows)


@dataclass(frozen=True)
class SinkhornResult:
    """Result of :func:`sinkhorn`: the plan plus how it was reached."""

    plan: Tensor  # [B, C, V, P], plan[b, c] = diag(r) K diag(g)
    r: Tensor  # [B, C, V] row scaling (linear even if solved in the log domain; may be inf)
    g: Tensor  # [B, C, P] column scaling (likewise)
    iterations: Tensor  # [B] int64
    converged: Tensor  # [B] bool
    error: Tensor  # [B] final mean |r - r_prev|
    log_domain: bool


# ---------------------------------------------------------------------------------------
# One Sinkhorn step and its error, in both domains. ``K`` is [B, C, V, P] logically; it may
# be a transposed view of a [B, C, P, V] tensor (matmul reads either layout without a copy).


def sinkhorn_step(K: Tensor, a: Tensor, b: Tensor, r: Tensor, g: Tensor, log_domain: bool):
    """One iteration from (r, g): returns (r_new [B,C,V], g_new [B,C,P]).

    In the log domain every argument and result is a logarithm (log K, log a, ...).
    """
    if log_domain:
        r_new = a - torch.logsumexp(K + g.unsqueeze(-2), dim=-1)  # log a - log(K g)
        g_new = b - torch.logsumexp(K + r_new.unsqueeze(-1), dim=-2)  # log b - log(K^T r)
    else:
        # Both products as row-vector x matrix: batched BLAS runs that form several times
        # faster than matrix x column-vector on CPU, in either memory layout of K.
        r_new = a / torch.matmul(g.unsqueeze(-2), K.mT).squeeze(-2)  # (K g)^T: [B,C,V]
        g_new = b / torch.matmul(r_new.unsqueeze(-2), K).squeeze(-2)  # (K^T r)^T: [B,C,P]
    return r_new, g_new


def log_change_sum(r_new: Tensor, r: Tensor, log_domain: bool) -> Tensor:
    """log of sum_{c,v} |r_new - r| for each batch element: [B]. -inf when equal.

    The stopping rule compares ``exp(log_change_sum) / (C * V)`` with the tolerance; a
    caller that splits C into chunks adds the chunks' sums (``logaddexp``).
    """
    if log_domain:
        hi = torch.maximum(r_new, r)
        gap = (r_new - r).abs()
        # |e^x - e^y| = e^max * (1 - e^-|x-y|); -inf where the two are equal.
        log_diff = hi + torch.log(-torch.expm1(-gap))
        log_diff = torch.where(gap == 0, torch.full_like(hi, -math.inf), log_diff)
        return torch.logsumexp(log_diff.flatten(1), dim=1)
    return torch.log((r_new - r).abs().flatten(1).sum(dim=1))


def _error_from_log_sum(log_sum: Tensor, count: int) -> Tensor:
    return torch.exp(log_sum - math.log(count))


def run_steps(
    K: Tensor,
    a: Tensor,
    b: Tensor,
    r: Tensor,
    g: Tensor,
    n: int,
    *,
    log_domain: bool,
    after_step: Callable[[int, Tensor, Tensor], None] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` unconditional iterations: returns (r, g, log change sums [B, n]).

    For callers that decide when to stop themselves (one image's classes solved chunk by
    chunk, whose stopping rule needs every chunk's change). ``after_step(j, r, g)`` sees
    the scalings after step j.
    """
    B = K.shape[0]
    log_changes = torch.empty(B, n, dtype=K.dtype, device=K.device)
    for j in range(n):
        r_new, g = sinkhorn_step(K, a, b, r, g, log_domain)
        log_changes[:, j] = log_change_sum(r_new, r, log_domain)
        r = r_new
        if after_step is not None:
            after_step(j, r, g)
    return r, g, log_changes


def solve_scalings(
    K: Tensor,
    a: Tensor,
    b: Tensor,
    *,
    log_domain: bool,
    tol: float,
    max_iter: int,
    sync_every: int | None = None,
) -> Scalings:
    """Run Sinkhorn on a prepared kernel (``log K`` when ``log_domain``).

    K: [B, C, V, P]; a: [B, C, V]; b: [B, C, P] (logs of the marginals when
    ``log_domain``). ``sync_every`` is how often the host looks at which elements are
    still running (1 on CPU, where it is free; 10 on GPU, where a read per iteration
    costs more than the arithmetic). Finished elements are frozen by masks between
    looks and dropped from the working set at each look; results do not depend on it.
    """
    B, C, V, P = K.shape
    assert a.shape == (B, C, V) and b.shape == (B, C, P), (K.shape, a.shape, b.shape)
    if sync_every is None:
        sync_every = 1 if K.device.type == "cpu" else 10
    log_tol = math.log(tol)
    fill = 0.0 if log_domain else 1.0
    r_out = torch.full((B, C, V), fill, dtype=K.dtype, device=K.device)
    g_out = torch.full((B, C, P), fill, dtype=K.dtype, device=K.device)
    iters_out = torch.zeros(B, dtype=torch.int64, device=K.device)
    conv_out = torch.zeros(B, dtype=torch.bool, device=K.device)
    err_out = torch.full((B,), math.inf, dtype=K.dtype, device=K.device)

    live = torch.arange(B, device=K.device)  # batch indices still in the working set
    Kl, al, bl, r, g = K, a, b, r_out.clone(), g_out.clone()
    active = torch.ones(B, dtype=torch.bool, device=K.device)  # over the working set
    iters = torch.zeros(B, dtype=torch.int64, device=K.device)
    log_err = torch.full((B,), math.inf, dtype=K.dtype, device=K.device)

    def write_back():
        r_out[live], g_out[live], iters_out[live] = r, g, iters
        err_out[live] = _error_from_log_sum(log_err, C * V)
        conv_out[live] = log_err - math.log(C * V) < log_tol

    for it in range(max_iter):
        r_new, g_new = sinkhorn_step(Kl, al, bl, r, g, log_domain)
        step_err = log_change_sum(r_new, r, log_domain)  # [live]
        mask = active.view(-1, 1, 1)
        r = torch.where(mask, r_new, r)
        g = torch.where(mask, g_new, g)
        log_err = torch.where(active, step_err, log_err)
        iters = iters + active
        active = active & ~(step_err - math.log(C * V) < log_tol)
        if (it + 1) % sync_every == 0 or it + 1 == max_iter:
            n_active = int(active.sum())
            if n_active == 0:
                break
            if n_active < active.numel():  # drop finished elements from the working set
                write_back()
                keep = active.nonzero().squeeze(1)
                live, Kl, al, bl = live[keep], Kl[keep], al[keep], bl[keep]
                r, g, iters, log_err = r[keep], g[keep], iters[keep], log_err[keep]
                active = active[keep]
    write_back()
    return Scalings(r_out, g_out, log_domain, iters_out, conv_out, err_out)


def transport_plan(K: Tensor, r: Tensor, g: Tensor, log_domain: bool) -> Tensor:
    """T = diag(r) K diag(g): [B, C, V, P]; K, r, g are logarithms when ``log_domain``."""
    if log_domain:
        return torch.exp(r.unsqueeze(-1) + K + g.unsqueeze(-2))
    return r.unsqueeze(-1) * K * g.unsqueeze(-2)


def plan_from_scalings(K: Tensor, s: Scalings) -> Tensor:
    """The plan of solved scalings ``s`` (K, or log K in the log domain, as solved)."""
    return transport_plan(K, s.r, s.g, s.log_domain)


def _as_bcv(x: Tensor, B: int, C: int, n: int, name: str) -> Tensor:
    if x.dim() == 2 and x.shape == (B, n):
        return x.unsqueeze(1).expand(B, C, n)
    if x.shape == (B, C, n):
        return x
    raise ValueError(f"{name} has shape {tuple(x.shape)}; expected ({B}, {n}) or ({B}, {C}, {n})")


def sinkhorn(
    cost: Tensor,
    row_marginals: Tensor,
    col_marginals: Tensor,
    *,
    eps: float = 0.1,
    tol: float = 1e-2,
    max_iter: int = 100,
    log_domain: bool | None = None,
    sync_every: int | None = None,
) -> SinkhornResult:
    """Entropic OT between row and column marginals, batched with a per-element stop.

    cost: [B, C, V, P] (or [B, V, P] for C = 1). row_marginals: [B, V] or [B, C, V];
    col_marginals: [B, P] or [B, C, P]; each row should sum to 1. ``log_domain=None``
    picks the kernel form when ``exp(-cost/eps)`` stays well inside the dtype's range for
    *this* cost's span (so the choice can depend on the batch: pass ``log_domain``
    explicitly where results must not; the AWT scorer decides from the fixed bound of
    cosine costs, see :func:`kernel_form_is_safe`).
    """
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if tol <= 0 or max_iter < 1:
        raise ValueError(f"need tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
    squeeze = cost.dim() == 3
    if squeeze:
        cost = cost.unsqueeze(1)
    if cost.dim() != 4:
        raise ValueError(f"cost must be [B, C, V, P] or [B, V, P], got shape {tuple(cost.shape)}")
    B, C, V, P = cost.shape
    a = _as_bcv(row_marginals.to(cost.dtype), B, C, V, "row_marginals")
    b = _as_bcv(col_marginals.to(cost.dtype), B, C, P, "col_marginals")
    if log_domain is None:
        span = float(cost.max() - cost.min()) if cost.numel() else 0.0
        log_domain = not kernel_form_is_safe(span, eps, cost.dtype)
    if log_domain:
        K = -cost / eps
        s = solve_scalings(
            K, a.log(), b.log(), log_domain=True, tol=tol, max_iter=max_iter, sync_every=sync_every
        )
    else:
        K = torch.exp(-cost / eps)
        s = solve_scalings(
            K, a, b, log_domain=False, tol=tol, max_iter=max_iter, sync_every=sync_every
        )
    plan = plan_from_scalings(K, s)
    r, g = (s.r.exp(), s.g.exp()) if log_domain else (s.r, s.g)
    if squeeze:
        plan, r, g = plan.squeeze(1), r.squeeze(1), g.squeeze(1)
    return SinkhornResult(plan, r, g, s.iterations, s.converged, s.error, log_domain)
