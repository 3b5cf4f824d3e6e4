"""The Gaussian-mixture half of TransCLIP (:mod:`awt_engine.adapt.transclip`), in row blocks.

Class means ``mu`` [C, D] and one shared diagonal covariance ``var`` [D] (float64: they
are sums over all N images). The log-likelihood of image i under class k is computed
with matmuls, never an [N, C, D] tensor::

    log p_ik = -1/2 sum_d (f_id - mu_kd)^2 / var_d - 1/2 sum_d log var_d - D/2 log 2 pi
             =  f_i . (mu_k / var)  -  1/2 |mu_k|^2_var          (depends on k)
              - 1/2 |f_i|^2_var - 1/2 sum_d log var_d - D/2 log 2 pi   (does not)

Every sum over images is accumulated in float64 block by block, so the means and
variances do not depend on the block size or the row order beyond float rounding.

Axes::

    N images (b in a block)   C classes   D embedding width
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from awt_engine.adapt._transclip_graph import affinity_rows


def blocks(N: int, rows: int) -> Iterator[tuple[int, int]]:
    for start in range(0, N, rows):
        yield start, min(N, start + rows)


def feature_squares(features: Tensor, rows: int) -> Tensor:
    """``sum_i f_i^2`` per dimension: [D] float64."""
    N, D = features.shape
    out = torch.zeros(D, dtype=torch.float64, device=features.device)
    for s, e in blocks(N, rows):
        out += features[s:e].to(torch.float64).square().sum(0)
    return out


def class_loglik(f: Tensor, mu: Tensor, var: Tensor, dtype: torch.dtype) -> Tensor:
    """The class-dependent part of log p for a block: f [b, D] -> [b, C] in ``dtype``."""
    precision = 1.0 / var  # [D]
    A = (mu * precision).to(dtype)  # [C, D]
    bias = (-0.5 * (mu.square() * precision).sum(1)).to(dtype)  # [C]
    return f.to(dtype) @ A.T + bias


def full_loglik(f: Tensor, mu: Tensor, var: Tensor) -> Tensor:
    """log p for a block in float64, constants included: f [b, D] -> [b, C]."""
    D = var.shape[0]
    f64 = f.to(torch.float64)
    const = -0.5 * (f64.square() / var).sum(1, keepdim=True)  # [b, 1]
    const = const - 0.5 * var.log().sum() - 0.5 * D * math.log(2 * math.pi)
    return class_loglik(f64, mu, var, torch.float64) + const


def top_weights(z: Tensor, n: int, rows: int) -> Tensor:
    """Which images are class c's ``n`` most confident, without breaking ties by
    position: the threshold t_c (the n-th largest value of z[:, c]) and the share of a
    slot each image tied at t_c gets, ``(n - #{z > t}) / #{z == t}`` (images above t_c
    get a whole slot): [2, C] float64."""
    N, C = z.shape
    best = torch.full((0, C), -torch.inf, dtype=z.dtype, device=z.device)
    for s, e in blocks(N, rows):
        best = torch.cat([best, z[s:e]]).topk(min(n, best.shape[0] + e - s), dim=0).values
    t = best[-1]  # [C]
    above = torch.zeros(C, dtype=torch.float64, device=z.device)
    tied = torch.zeros_like(above)
    for s, e in blocks(N, rows):
        above += (z[s:e] > t).sum(0)
        tied += (z[s:e] == t).sum(0)
    return torch.stack([t.to(torch.float64), (n - above) / tied])


def init_means(
    z: Tensor, features: Tensor, class_features: Tensor, n: int, normalize: bool, rows: int
) -> Tensor:
    """mu_c from the ``n`` images most confident for class c (official code: top 8):
    direction ``sum_i a_ic z_ic f_i`` over those images (a_ic their slot weight, shared
    by ties), unit length (``normalize``) or divided by ``sum_i a_ic z_ic`` (the
    z-weighted mean). A class with no mass falls back to its text embedding. [C, D] f64."""
    N, C = z.shape
    n = min(n, N)
    t, share = top_weights(z, n, rows)
    num = torch.zeros(C, features.shape[1], dtype=torch.float64, device=z.device)
    den = torch.zeros(C, dtype=torch.float64, device=z.device)
    for s, e in blocks(N, rows):
        zb = z[s:e].to(torch.float64)  # [b, C]
        slot = (zb > t).to(torch.float64) + (zb == t).to(torch.float64) * share
        a = slot * zb  # [b, C]
        num += a.T @ features[s:e].to(torch.float64)
        den += a.sum(0)
    return _finish_means(num, den, class_features, normalize, fallback=None)


def _finish_means(num, den, class_features, normalize, fallback):
    norm = num.norm(dim=1, keepdim=True)  # [C, 1]
    mu = num / norm if normalize else num / den.unsqueeze(1)
    bad = (den <= 0) | (norm.squeeze(1) <= 0) | ~mu.isfinite().all(1)
    if bool(bad.any()):
        if fallback is None:
            fallback = class_features.to(torch.float64)
        mu[bad] = fallback[bad]
    return mu


def statistics(z: Tensor, features: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """``M = sum_i z_i f_i^T`` [C, D] and ``n = sum_i z_i`` [C], float64 sums of
    ``dtype`` block products."""
    N, C = z.shape
    M = torch.zeros(C, features.shape[1], dtype=torch.float64, device=z.device)
    n = torch.zeros(C, dtype=torch.float64, device=z.device)
    for s, e in blocks(N, rows):
        M += (z[s:e].T @ features[s:e].to(z.dtype)).to(torch.float64)
        n += z[s:e].sum(0).to(torch.float64)
    return M, n


def update_means(M: Tensor, n: Tensor, previous: Tensor, normalize: bool) -> Tensor:
    """Closed form ``mu_k = M_k / n_k`` (normalised to unit length when ``normalize``,
    as the official code does); a class with no mass keeps its previous mean."""
    return _finish_means(M, n, None, normalize, fallback=previous)


def update_variances(F2: Tensor, M: Tensor, n: Tensor, mu: Tensor, N: int, floor: float) -> Tensor:
    """Closed form ``var_d = 1/N sum_i sum_k z_ik (f_id - mu_kd)^2`` from the sums, using
    ``sum_k z_ik = 1``: ``(F2 - 2 sum_k mu_k M_k + sum_k n_k mu_k^2) / N``, floored."""
    total = F2 - 2 * (mu * M).sum(0) + (n.unsqueeze(1) * mu.square()).sum(0)  # [D]
    return (total / N).clamp(min=floor)


def objective(
    z: Tensor, scores: Tensor, features: Tensor, S: Tensor | None, mu: Tensor, var: Tensor,
    alpha: float, beta: float, lam: float, rows: int,
) -> float:  # fmt: skip
    """The TransCLIP objective at (z, mu, var) in float64 (see transclip's docstring)::

    -alpha sum_i z_i.log p_i - beta/2 sum_i z_i.(S z)_i + sum_i (z_i.log z_i - lam z_i.log yhat_i)
    """
    N = z.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for s, e in blocks(N, rows):
        zb = z[s:e].to(torch.float64)  # [b, C]
        log_y = torch.log_softmax(scores[s:e].to(torch.float64), dim=1)
        gmm = -alpha * (zb * full_loglik(features[s:e], mu, var)).sum()
        kl = torch.special.xlogy(zb, zb).sum() - lam * (zb * log_y).sum()
        lap = torch.zeros((), dtype=torch.float64)
        if S is not None:
            Sz = affinity_rows(S, s, e) @ z  # [b, C]
            lap = -0.5 * beta * (zb * Sz.to(torch.float64)).sum()
        total += (gmm + kl + lap).cpu()
    return float(total)
