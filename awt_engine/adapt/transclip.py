"""TransCLIP: transductive zero-shot adaptation over the whole test set.

Zanella, Gérin, Ben Ayed, "Boosting Vision-Language Models with Transduction",
NeurIPS 2024 (arXiv 2406.01837); official code github.com/MaxZanella/transduction-for-vlms
(AGPL: read for its constants and initialisation, not copied). Written from the paper's
equations; the zero-shot objective (no labelled shots).

Objective, minimised over the assignments z_i (rows of the simplex), the class means
mu_k and one shared diagonal covariance Sigma = diag(var)::

    L(z, mu, Sigma) = - alpha sum_i z_i . log p_i                      (Gaussian mixture)
                      - beta  sum_i sum_{j in kNN(i)} w_ij z_i . z_j   (Laplacian)
                      + sum_i KL_lambda(z_i || yhat_i)                 (text prior)

    p_ik = N(f_i; mu_k, Sigma)      w_ij = max(0, f_i . f_j), j among i's k nearest images
    KL_lambda(z_i || yhat_i) = z_i . log z_i - lambda z_i . log yhat_i
    yhat_i = softmax(base scores_i)

Block majorize-minimize (BMM), as the paper. The Laplacian is replaced by its tangent at
the current z, which decouples the images; each z-step is then closed form::

    z_i <- softmax( lambda log yhat_i + alpha log p_i + beta ((W + W^T) z)_i )
         = yhat_i^lambda * exp(alpha log p_i + beta sum_j (w_ij + w_ji) z_j) / normaliser

run ``z_steps`` times with mu, Sigma fixed (all images at once from the previous z), then
the closed-form minimisers ``mu_k = sum_i z_ik f_i / sum_i z_ik`` and
``var_d = 1/N sum_i sum_k z_ik (f_id - mu_kd)^2``. Order (official code): z-block, then
``n_iters`` times (mu, Sigma, z-block). Output scores = log z, clamped at
log(finfo.tiny) so they stay finite; softmax(scores) = z.

When a step lowers L: mu and Sigma steps are exact minimisers (with
``normalize_means=False``). The paper's argument for the z-step needs the Laplacian
concave (W positive semi-definite); a kNN graph without self-loops never is (zero
trace). Here the entropy in the KL term supplies the curvature: ``z . log z`` is
1-strongly convex on the simplex, so a z-step lowers L whenever
``beta * |lambda_min(W + W^T)| <= 1``; by Gershgorin that holds whenever no image is
among the k nearest of more than k others (row sums of W + W^T <= 2k = 1/beta at the
default). tests/test_adapt_transclip.py builds its data so the condition holds and checks it.

=====================  ===========================================  =======================
                       paper / official code                        here
=====================  ===========================================  =======================
GMM weight alpha       paper: 1/|Q| in L, 1 in its z-update;        ``gmm_weight`` = 1/50
                       official: exp(1/50 * (log p + ...))          (the official constant)
Laplacian weight beta  paper: 1; official: 50/(2k) inside the 1/50  ``laplacian_weight / k``
                       -> beta = 1/(2k)                             = 0.5 / k
log p                  official: no log det term (cancels in z)     full Gaussian density
                                                                    (needed for L to fall
                                                                    in the Sigma step)
mean update            paper: weighted mean; official: then         ``normalize_means``
                       normalised to unit length                    (default True, official)
mean init              official: top-8 images per class by z,       same; ties at the 8th
                       z-weighted, normalised                       share slots; a class
                                                                    with no mass: text emb.
affinity               official: raw f_i . f_j, top k+1 minus the   max(0, f_i . f_j), self
                       first hit, dense N x N on the GPU            excluded by index, faiss
                                                                    + float64 re-rank, ties
                                                                    share the k-th slot
variance               no floor                                     floored at var_floor
empty class            NaN mean                                     keeps its previous mean
=====================  ===========================================  =======================

Memory. The caller's scores [N, C] and features [N, D] are read block by block. This
solver holds three [N, C] buffers (unary term, z, next z; the result's z and scores
reuse two of them), the graph (``[N, K]`` int64 + float64, and ``W + W^T`` as CSR, at
most 2NK entries of 8 + 4 bytes), float64 statistics ([C, D] means and sums) and one
row block sized by ``memory_budget``. While the graph is built faiss holds its own
float32 copy of the features and a 16 MB distance block (freed before the iterations). For N = 50,000, C = 1,000,
D = 512, k = 3 in float32: 3 * 50,000 * 1,000 * 4 = 600 MB, graph ~ 7 MB, statistics
~ 12 MB, faiss copy 102 MB (graph phase only), plus the block budget (default 64 MiB):
peak about 690 MB above the caller's 300 MB of inputs. Measured (process peak RSS above
the inputs, benchmarks/bench_transduction.py): 621 to 873 MiB over runs on one machine;
the spread is the allocator's (freed blocks not returned at once), not the solver's.

Axes::

    N images   C classes   D embedding width   K neighbours kept per image
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from awt_engine.adapt import _transclip_gmm as gmm
from awt_engine.adapt._transclip_graph import (
    KnnGraph,
    affinity_rows,
    knn_graph,
    symmetric_affinity,
)
from awt_engine.adapt.base import AdaptBatch, TransductiveAdaptation, register_adaptation
from awt_engine.options import check_config, option

DEFAULT_MEMORY_BUDGET = 64 * 2**20  # bytes for one row block's temporaries


@dataclass(frozen=True)
class TransCLIPConfig:
    # official TransCLIP_solver: n_neighbors = 3
    n_neighbors: int = option(3, "k of the kNN affinity graph", bounds=(1, 1024))
    # official get_parameters (zero-shot): lambda_value = 1; the paper: 1 zero-shot
    kl_lambda: float = option(1.0, "lambda of the KL term (power on yhat)", bounds=(0.0, 100.0))
    # official update_z: exp(1/50 * (log p + ...))
    gmm_weight: float = option(0.02, "alpha, weight of the Gaussian term", bounds=(0.0, 1e3))
    # official update_z: (50 / (2k)) (W^T z + W z) inside the 1/50 -> beta = 1/(2k)
    laplacian_weight: float = option(
        0.5, "beta * k, weight of the Laplacian term", bounds=(0.0, 1e3)
    )
    # official TransCLIP_solver: max_iter = 10 (z-block run max_iter + 1 times)
    n_iters: int = option(10, "outer iterations (mu, Sigma, z-block)", bounds=(0, 1000))
    # official update_z: max_iter = 5
    z_steps: int = option(5, "z-steps per z-block (mu, Sigma fixed)", bounds=(1, 1000))
    # official init_mu: n_most_confident = 8
    n_confident: int = option(8, "images per class that initialise its mean", bounds=(1, 10**6))
    # official init_sigma: std_init = 1 / d (used as the variance); None -> 1/D
    init_variance: float | None = option(
        None, "initial variance per dimension (none: 1/D)", bounds=(1e-12, 1e3)
    )
    # official update_mu / init_mu: mu /= mu.norm(); the paper's closed form does not
    normalize_means: bool = option(True, "unit-length class means (official code)")
    # not in the paper or official code: keeps 1/var finite if a dimension is constant
    var_floor: float = option(1e-6, "floor on each variance", bounds=(1e-12, 1.0))


@dataclass(frozen=True)
class TransCLIPResult:
    """What :func:`transclip` found."""

    z: Tensor  # [N, C] assignments (rows sum to 1)
    scores: Tensor  # [N, C] log z, clamped at log(finfo.tiny): softmax(scores) = z
    objective: Tensor  # [T] float64 L after each block update (empty unless tracked)
    steps: tuple[str, ...]  # [T] the update before each value: init, z, mu, sigma
    iterations: int  # outer iterations run (mu/Sigma updates; z-blocks: one more)
    means: Tensor  # [C, D] float64 final mu
    variances: Tensor  # [D] float64 final diag(Sigma)
    graph: KnnGraph  # the kNN graph ([N, K] neighbours and weights)


def rows_per_block(memory_budget: int | None, C: int, D: int, k: int, dtype) -> int:
    """Rows per block so one block's temporaries fit ``memory_budget`` bytes: the z-step
    and log-likelihood ([b, C] several times, float64 when tracking) and the graph's
    float64 re-ranking (two [b, M, D], M = k + 9 candidates)."""
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    item = torch.finfo(dtype).bits // 8
    per_row = max(6 * C * item + 4 * C * 8 + 2 * D * 8, 2 * (k + 9) * (D + 4) * 8)
    return max(1, budget // per_row)


def _check(batch: AdaptBatch, dtype: torch.dtype) -> None:
    N, C = batch.scores.shape
    if N < 1 or C < 1:
        raise ValueError(f"transclip needs at least one image and one class, got N={N}, C={C}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    for name, x in (("scores", batch.scores), ("features", batch.features)):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"transclip: {name} must be finite")


def _unary(u, scores, features, mu, var, cfg, rows) -> None:
    """u <- lambda log yhat + alpha (class part of log p), block by block: [N, C]."""
    N = u.shape[0]
    for s, e in gmm.blocks(N, rows):
        log_y = torch.log_softmax(scores[s:e].to(u.dtype), dim=1)
        u[s:e] = cfg.kl_lambda * log_y + cfg.gmm_weight * gmm.class_loglik(
            features[s:e], mu, var, u.dtype
        )


def _z_step(z_next: Tensor, z: Tensor, u: Tensor, S: Tensor | None, beta: float, rows) -> None:
    """z_next <- softmax(u + beta (W + W^T) z), all images from the same z: [N, C]."""
    N = z.shape[0]
    for s, e in gmm.blocks(N, rows):
        logits = u[s:e] if S is None else u[s:e] + beta * (affinity_rows(S, s, e) @ z)
        z_next[s:e] = torch.softmax(logits, dim=1)


def transclip(
    batch: AdaptBatch,
    config: TransCLIPConfig | None = None,
    memory_budget: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    track_objective: bool = False,
    observe: Callable[[str, Tensor, Tensor, Tensor], None] | None = None,
) -> TransCLIPResult:
    """TransCLIP on the N images of ``batch`` (scores [N, C], features [N, D]).
    ``track_objective`` evaluates L (float64, one more pass) after every block update;
    ``observe(step, z, mu, var)`` sees the state after each (step: init, z, mu, sigma;
    z is a buffer the solver reuses: copy what you keep)."""
    cfg = TransCLIPConfig() if config is None else config
    check_config(cfg)
    _check(batch, dtype)
    scores, features = batch.scores, batch.features
    N, C = scores.shape
    D = features.shape[1]
    k = min(cfg.n_neighbors, N - 1)
    beta = cfg.laplacian_weight / cfg.n_neighbors
    rows = rows_per_block(memory_budget, C, D, k, dtype)
    values, steps = [], []
    with torch.no_grad():
        graph = knn_graph(features, cfg.n_neighbors, rows)
        S = symmetric_affinity(graph, dtype) if graph.neighbours.shape[1] else None
        F2 = gmm.feature_squares(features, rows)  # [D]
        z = torch.empty(N, C, dtype=dtype, device=scores.device)
        z_next, u = torch.empty_like(z), torch.empty_like(z)
        for s, e in gmm.blocks(N, rows):
            z[s:e] = torch.softmax(scores[s:e].to(dtype), dim=1)  # z = yhat
        mu = gmm.init_means(
            z, features, batch.class_features, cfg.n_confident, cfg.normalize_means, rows
        )
        var = torch.full((D,), cfg.init_variance or 1.0 / D, dtype=torch.float64)
        var = var.to(z.device)

        def track(step: str) -> None:
            if observe is not None:
                observe(step, z, mu, var)
            if track_objective:
                args = (cfg.gmm_weight, beta, cfg.kl_lambda, rows)
                values.append(gmm.objective(z, scores, features, S, mu, var, *args))
                steps.append(step)

        track("init")
        for it in range(cfg.n_iters + 1):
            _unary(u, scores, features, mu, var, cfg, rows)
            for _ in range(cfg.z_steps):
                _z_step(z_next, z, u, S, beta, rows)
                z, z_next = z_next, z
                track("z")
            if it == cfg.n_iters:
                break
            M, n = gmm.statistics(z, features, rows)  # [C, D], [C]
            mu = gmm.update_means(M, n, mu, cfg.normalize_means)
            track("mu")
            var = gmm.update_variances(F2, M, n, mu, N, cfg.var_floor)
            track("sigma")
        del z_next
        floor = math.log(torch.finfo(dtype).tiny)
        for s, e in gmm.blocks(N, rows):
            u[s:e] = z[s:e].log().clamp(min=floor)
    objective = torch.tensor(values, dtype=torch.float64)
    return TransCLIPResult(z, u, objective, tuple(steps), cfg.n_iters, mu, var, graph)


@register_adaptation
class TransCLIP(TransductiveAdaptation):
    name = "transclip"
    summary = "GMM + kNN Laplacian + KL to the base scores over the whole set (BMM)"
    paper = (
        "Zanella, Gérin, Ben Ayed, Boosting Vision-Language Models with Transduction, NeurIPS 2024"
    )
    Config = TransCLIPConfig

    def solve(self, batch: AdaptBatch, config=None, memory_budget: int | None = None) -> Tensor:
        """Adapted scores [N, C] (log z; softmax gives TransCLIP's assignments)."""
        return transclip(batch, config, memory_budget).scores


__all__ = ["TransCLIP", "TransCLIPConfig", "TransCLIPResult", "rows_per_block", "transclip"]
