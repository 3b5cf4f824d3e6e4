"""TransCLIP (awt_engine.adapt.transclip) against a dense float64 reference written here
from the paper's objective and BMM updates (Zanella et al., NeurIPS 2024) with the
official code's constants: a plain-sort kNN over the dense N x N similarity matrix,
einsum log-likelihoods over [N, C, D], and loops for the initialisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from awt_engine.adapt import AdaptBatch, adapt_config, get_adaptation
from awt_engine.adapt.transclip import TransCLIPConfig, rows_per_block, transclip

# ---------------------------------------------------------------------------------------
# The reference: dense, float64, loops and einsum.


def dense_knn_affinity(f: torch.Tensor, k: int) -> torch.Tensor:
    """W [N, N]: row i holds max(0, f_i . f_j) for i's k most similar other images."""
    N = f.shape[0]
    sims = f @ f.T
    W = torch.zeros(N, N, dtype=torch.float64)
    for i in range(N):
        others = sorted((j for j in range(N) if j != i), key=lambda j: -float(sims[i, j]))
        for j in others[: min(k, N - 1)]:
            W[i, j] = max(0.0, float(sims[i, j]))
    return W


def log_gauss(f, mu, var):
    """log N(f_i; mu_k, diag(var)) for all i, k: [N, C], through an [N, C, D] tensor."""
    D = f.shape[1]
    sq = torch.einsum("ikd,d->ik", (f[:, None, :] - mu[None]) ** 2, 1 / var)
    return -0.5 * sq - 0.5 * var.log().sum() - 0.5 * D * math.log(2 * math.pi)


def objective(z, mu, var, scores, f, W, cfg):
    """The paper's objective (weights as in the official code): float64 scalar."""
    alpha, beta, lam = cfg.gmm_weight, cfg.laplacian_weight / cfg.n_neighbors, cfg.kl_lambda
    z = z.double()
    log_y = torch.log_softmax(scores, dim=1)
    gmm = -alpha * (z * log_gauss(f, mu, var)).sum()
    lap = -beta * torch.einsum("ij,ic,jc->", W, z, z)
    kl = torch.special.xlogy(z, z).sum() - lam * (z * log_y).sum()
    return float(gmm + lap + kl)


def reference_transclip(scores, f, cfg):
    scores, f = scores.double(), f.double()
    N, C = scores.shape
    D = f.shape[1]
    alpha, beta, lam = cfg.gmm_weight, cfg.laplacian_weight / cfg.n_neighbors, cfg.kl_lambda
    W = dense_knn_affinity(f, cfg.n_neighbors)
    y_hat = torch.softmax(scores, dim=1)
    z = y_hat.clone()
    mu = torch.zeros(C, D, dtype=torch.float64)
    for c in range(C):  # the n most confident images of class c, z-weighted
        top = sorted(range(N), key=lambda i: -float(z[i, c]))[: min(cfg.n_confident, N)]
        v = sum(z[i, c] * f[i] for i in top)
        mu[c] = v / v.norm() if cfg.normalize_means else v / sum(z[i, c] for i in top)
    var = torch.full((D,), 1.0 / D, dtype=torch.float64)
    for it in range(cfg.n_iters + 1):
        log_p = log_gauss(f, mu, var)
        for _ in range(cfg.z_steps):
            z = torch.softmax(lam * y_hat.log() + alpha * log_p + beta * (W + W.T) @ z, dim=1)
        if it == cfg.n_iters:
            break
        mu = (z.T @ f) / z.sum(0)[:, None]
        if cfg.normalize_means:
            mu = mu / mu.norm(dim=1, keepdim=True)
        var = torch.einsum("ik,ikd->d", z, (f[:, None, :] - mu[None]) ** 2) / N
        var = var.clamp(min=cfg.var_floor)
    return z, W


# ---------------------------------------------------------------------------------------
# Data


def clustered(N, C, D, *, seed, spread=0.4, text_noise=0.3, score_noise=1.0, scale=5.0):
    """Features around C random unit means (label i % C); base scores = scale * cosine to
    noisy text embeddings plus per-image noise: weak but informative."""
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(C, D, generator=g), dim=1)
    labels = torch.arange(N) % C
    f = F.normalize(means[labels] + spread / D**0.5 * torch.randn(N, D, generator=g), dim=1)
    t = F.normalize(means + text_noise * torch.randn(C, D, generator=g), dim=1)
    scores = scale * f @ t.T + score_noise * torch.randn(N, C, generator=g)
    return AdaptBatch(scores, f, t), labels


def accuracy(scores, labels) -> float:
    return float((scores.argmax(1) == labels).float().mean())


# ---------------------------------------------------------------------------------------
# Fixed point against the reference


@pytest.mark.parametrize(("normalize", "n_iters"), [(True, 10), (False, 10), (True, 0)])
def test_matches_dense_reference_for_any_block_size(normalize, n_iters):
    """n_iters=0: one z-block from the initial means (the initialisation shows)."""
    batch, _ = clustered(60, 4, 8, seed=1, spread=1.0, score_noise=0.5)
    cfg = TransCLIPConfig(normalize_means=normalize, n_iters=n_iters)
    z_ref, _ = reference_transclip(batch.scores, batch.features, cfg)
    seven = 7 * 2304  # bytes: 7 rows per block (the graph's re-ranking sizes a row here)
    assert rows_per_block(seven, 4, 8, 3, torch.float32) == 7
    assert rows_per_block(seven, 4, 8, 3, torch.float64) == 7
    for budget in (1, seven, None):  # 1 row, 7 rows, all 60 in one block
        r64 = transclip(batch, cfg, budget, dtype=torch.float64)
        assert torch.allclose(r64.z, z_ref, atol=1e-10), (budget, (r64.z - z_ref).abs().max())
        r32 = transclip(batch, cfg, budget)
        assert torch.allclose(r32.z.double(), z_ref, atol=1e-5), (
            (r32.z.double() - z_ref).abs().max()
        )
    # the reference is not trivial: the Laplacian and the GMM moved z away from yhat
    assert (z_ref - torch.softmax(batch.scores.double(), 1)).abs().max() > 0.05


def test_graph_is_the_plain_sort_knn():
    batch, _ = clustered(60, 4, 8, seed=2, spread=1.0)
    r = transclip(batch, TransCLIPConfig(n_iters=0, z_steps=1), dtype=torch.float64)
    W = torch.zeros(60, 60, dtype=torch.float64)
    W[torch.arange(60)[:, None].expand_as(r.graph.neighbours), r.graph.neighbours] += (
        r.graph.weights
    )
    assert torch.allclose(W, dense_knn_affinity(batch.features.double(), 3), atol=1e-12)


# ---------------------------------------------------------------------------------------
# The objective never increases


def test_objective_never_increases_across_block_updates():
    """With ``normalize_means=False`` every block is a (majorize-)minimisation: mu and
    Sigma exactly, z through the tangent of the Laplacian. The z-step is guaranteed to
    lower L when beta * |lambda_min(W + W^T)| <= 1 (the entropy's strong convexity; see
    the module docstring); checked on this data first. Computed in float64 here."""
    batch, _ = clustered(80, 5, 16, seed=3, spread=1.2, score_noise=1.5)
    cfg = TransCLIPConfig(normalize_means=False, n_iters=6, z_steps=3)
    f, scores = batch.features.double(), batch.scores.double()
    W = dense_knn_affinity(f, cfg.n_neighbors)
    lam_min = float(torch.linalg.eigvalsh(W + W.T)[0])
    assert cfg.laplacian_weight / cfg.n_neighbors * abs(lam_min) <= 1.0, lam_min
    seen = []

    def observe(step, z, mu, var):
        seen.append((step, objective(z, mu, var, scores, f, W, cfg)))

    r = transclip(batch, cfg, dtype=torch.float64, track_objective=True, observe=observe)
    steps = [s for s, _ in seen]
    assert steps[:2] == ["init", "z"] and steps.count("mu") == 6 and steps.count("z") == 21
    values = torch.tensor([v for _, v in seen], dtype=torch.float64)
    assert torch.allclose(values, r.objective, rtol=1e-9, atol=1e-9)  # its own tracking agrees
    rises = values.diff()
    assert (rises <= 1e-9 * values.abs()[1:]).all(), list(
        zip(steps[1:], rises.tolist(), strict=True)
    )
    assert values[-1] < values[0] - 1.0  # and it did go down


def test_normalised_means_only_break_the_mu_step():
    """The official unit-length means are not the mu-minimiser: that step may raise L;
    the z and Sigma steps still lower it."""
    batch, _ = clustered(80, 5, 16, seed=3, spread=1.2, score_noise=1.5)
    r = transclip(batch, TransCLIPConfig(n_iters=6, z_steps=3), dtype=torch.float64,
                  track_objective=True)  # fmt: skip
    rises = r.objective.diff()
    for step, rise, value in zip(r.steps[1:], rises, r.objective[1:], strict=True):
        if step != "mu":
            assert rise <= 1e-9 * abs(value), (step, rise)


# ---------------------------------------------------------------------------------------
# Order and blocking


def with_duplicates(seed):
    """Clustered data with ties: 4 exact copies of image 0 (different scores: the k-th
    neighbour of images near them is a 4-way tie for 1 slot), and for class 0 images
    10-13 strictly most confident and images 14-23 (different features, identical scores)
    tied for the remaining 4 of the 8 slots that initialise mu_0."""
    batch, labels = clustered(70, 4, 16, seed=seed, spread=1.0)
    f, s = batch.features.clone(), batch.scores.clone()
    f[1:4] = f[0]
    s[10:14] = torch.tensor([[10.0, 0, 0, 0]]) + 0.1 * torch.arange(4.0)[:, None]
    s[14:24] = torch.tensor([8.0, 0, 0, 0])
    z0 = torch.softmax(s, dim=1)[:, 0]
    order = z0.argsort(descending=True)
    assert set(order[:4].tolist()) == set(range(10, 14))  # the tie really is at the 8th
    assert set(order[4:14].tolist()) == set(range(14, 24)) and z0[order[13]] > z0[order[14]]
    return AdaptBatch(s, f, batch.class_features), labels


@pytest.mark.parametrize("n_iters", [0, 10])
def test_row_order_does_not_matter_even_with_ties(n_iters):
    batch, _ = with_duplicates(4)
    cfg = TransCLIPConfig(n_iters=n_iters)
    r = transclip(batch, cfg)
    perm = torch.randperm(70, generator=torch.Generator().manual_seed(0))
    rp = transclip(AdaptBatch(batch.scores[perm], batch.features[perm], batch.class_features), cfg)
    assert (rp.z - r.z[perm]).abs().max() < 1e-5
    assert torch.equal(rp.scores.argmax(1), r.scores.argmax(1)[perm])
    assert (rp.means - r.means).abs().max() < 1e-5


def test_ties_share_the_kth_slot():
    batch, _ = with_duplicates(4)
    g = transclip(batch, TransCLIPConfig(n_iters=0, z_steps=1)).graph
    assert g.neighbours.shape[1] >= 4  # some row kept a 4-way tie for its 3rd slot
    total = torch.zeros(70, dtype=torch.float64)
    w = g.weights
    sims = (batch.features.double()[g.neighbours] * batch.features.double()[:, None]).sum(-1)
    slots = torch.where(w > 0, w / sims.clamp(min=1e-12), torch.zeros_like(w)).sum(1)
    total += slots
    assert torch.allclose(total, torch.full((70,), 3.0, dtype=torch.float64))


def test_memory_budget_does_not_change_the_result():
    batch, _ = clustered(200, 6, 32, seed=5)
    tiny = transclip(batch, memory_budget=1)  # one row per block
    large = transclip(batch, memory_budget=2**30)  # one block
    assert (tiny.z - large.z).abs().max() < 1e-5
    assert torch.equal(tiny.z.argmax(1), large.z.argmax(1))


# ---------------------------------------------------------------------------------------
# It helps where it should


def test_planted_clusters_beat_the_base_scores():
    """Features cluster by class (D=128); base scores weak (text embeddings off by 0.3
    noise, per-image noise 1.0 on 5 x cosine). Measured: base 42.8% top-1, TransCLIP 100%."""
    batch, labels = clustered(400, 8, 128, seed=0)
    base = accuracy(batch.scores, labels)
    adapted = get_adaptation("transclip").solve(batch, adapt_config("transclip"))
    assert 0.3 < base < 0.6
    assert accuracy(adapted, labels) > base + 0.3
    z = torch.softmax(adapted, dim=1)
    assert torch.isfinite(adapted).all() and torch.allclose(z.sum(1), torch.ones(400))


# ---------------------------------------------------------------------------------------
# Config and edge cases


def test_config_defaults_are_the_cited_values():
    c = TransCLIPConfig()
    assert (c.n_neighbors, c.kl_lambda, c.n_iters, c.z_steps, c.n_confident) == (3, 1.0, 10, 5, 8)
    assert c.gmm_weight == 1 / 50 and c.laplacian_weight / c.n_neighbors == 1 / (2 * 3)
    assert c.init_variance is None and c.normalize_means is True


def test_string_options_and_bounds():
    c = adapt_config(
        "transclip", {"n-neighbors": "5", "normalize_means": "false", "init_variance": "none",
                      "kl_lambda": "0.5"},
    )  # fmt: skip
    assert (c.n_neighbors, c.normalize_means, c.init_variance, c.kl_lambda) == (5, False, None, 0.5)
    with pytest.raises(ValueError, match=r"n_neighbors.*got 0"):
        adapt_config("transclip", {"n_neighbors": "0"})
    with pytest.raises(ValueError, match=r"gmm_weight.*got -1.0"):
        adapt_config("transclip", {"gmm_weight": "-1"})
    with pytest.raises(ValueError, match="unknown option"):
        adapt_config("transclip", {"lambda": "1"})


def test_one_image_and_one_class():
    batch, _ = clustered(1, 3, 8, seed=6)
    out = get_adaptation("transclip").solve(batch)
    assert out.shape == (1, 3) and torch.isfinite(out).all()
    batch, _ = clustered(20, 1, 8, seed=6)
    out = get_adaptation("transclip").solve(batch)
    assert out.shape == (20, 1) and torch.equal(out, torch.zeros(20, 1))
    with pytest.raises(ValueError, match="finite"):
        b = AdaptBatch(batch.scores.clone().fill_(math.nan), batch.features, batch.class_features)
        transclip(b)
