"""Float64 references for the online adaptations, written from the official code's steps
in its own style (dicts of lists, one image at a time, dense per-class matrices), so
tests/test_adapt_tda.py and tests/test_adapt_dota.py check awt_engine.adapt.tda / dota
against an independent computation, not against their own output.

TDA: github.com/kdiAAA/TDA (tda_runner.py: update_cache, compute_cache_logits,
run_test_tda; utils.py: get_entropy, softmax_entropy, get_clip_logits for one view).
DOTA: the authors' runner (class DOTA: fit, update, predict; run_test_dota).
"""

from __future__ import annotations

import math

import torch

from awt_engine.adapt.base import AdaptBatch

# ---------------------------------------------------------------- TDA


def _entropy(logits):  # [1, C] -> [1] nats, as the official softmax_entropy
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def tda_offer(cache: dict, label: int, item: list, shots: int, events: list) -> None:
    """The official update_cache: append while there is room, else replace the last
    (worst) entry when the new entropy is strictly lower; then a stable sort by entropy."""
    if label not in cache:
        cache[label] = [item]
        events.append("new")
        return
    entries = cache[label]
    if len(entries) < shots:
        entries.append(item)
        events.append("append")
    elif item[1] < entries[-1][1]:
        entries[-1] = item
        events.append("replace")
    else:
        events.append("reject")
    cache[label] = sorted(entries, key=lambda e: float(e[1]))


def tda_cache_logits(f, cache: dict, alpha, beta, C, mask=None):
    """The official compute_cache_logits: keys in class order, values one-hot (positive)
    or the thresholded stored probabilities (negative)."""
    keys, values = [], []
    for label in sorted(cache):
        for entry in cache[label]:
            keys.append(entry[0])
            if mask is None:
                values.append(torch.nn.functional.one_hot(torch.tensor(label), C).double())
            else:
                p = entry[2][0]
                values.append(((p > mask[0]) & (p < mask[1])).double())
    K = torch.cat(keys, 0).T  # [D, n]
    V = torch.stack(values)  # [n, C]
    affinity = f @ K  # [1, n]
    return alpha * (torch.exp(-1 * (beta - beta * affinity)) @ V)


def tda_reference(scores, feats, cfg: dict):
    """(final logits [N, C], positive cache, negative cache, gate flags, event lists)."""
    N, C = scores.shape
    pos, neg, outs, gates, pos_events, neg_events = {}, {}, [], [], [], []
    for i in range(N):
        logits, f = scores[i : i + 1], feats[i : i + 1]
        loss = _entropy(logits)
        prob_map = logits.softmax(1)
        label = int(logits.topk(1, 1, True, True)[1].t()[0])
        normalised = float(loss / math.log2(C))  # the official get_entropy
        if cfg["pos_enabled"]:
            tda_offer(pos, label, [f, loss], cfg["pos_shot_capacity"], pos_events)
        gate = cfg["neg_entropy_lower"] < normalised < cfg["neg_entropy_upper"]
        gates.append(gate)
        if cfg["neg_enabled"] and gate:
            tda_offer(neg, label, [f, loss, prob_map], cfg["neg_shot_capacity"], neg_events)
        final = logits.clone()
        if cfg["pos_enabled"] and pos:
            final = final + tda_cache_logits(f, pos, cfg["pos_alpha"], cfg["pos_beta"], C)
        if cfg["neg_enabled"] and neg:
            bounds = (cfg["neg_mask_lower"], cfg["neg_mask_upper"])
            final = final - tda_cache_logits(f, neg, cfg["neg_alpha"], cfg["neg_beta"], C, bounds)
        outs.append(final[0])
    return torch.stack(outs), pos, neg, gates, pos_events, neg_events


# ---------------------------------------------------------------- DOTA


class DotaReference:
    """The authors' DOTA module in float64, per-class covariances kept as they keep them."""

    def __init__(self, cfg: dict, class_weights):  # class_weights [D, C]
        D, C = class_weights.shape
        self.eps, self.D = cfg["epsilon"], D
        self.mu = class_weights.T.clone()  # [C, D]
        self.c = torch.ones(C, dtype=torch.float64)
        self.Sigma = cfg["sigma"] * torch.eye(D, dtype=torch.float64).repeat(C, 1, 1)
        self.overall = self.Sigma.mean(0)
        self.Lambda = torch.linalg.pinv(self.overall)

    def fit(self, x, y):  # x [n, D], y [n, C]
        sw = y.sum(0)
        new_mu = (y.T @ x + self.c[:, None] * self.mu) / (sw[:, None] + self.c[:, None])
        new_c = self.c + sw
        xm = x[:, None, :] - self.mu[None, :, :]  # [n, C, D]
        delta = torch.einsum("bji,bjk->jik", y[:, :, None] * xm, xm)
        self.Sigma = (self.c[:, None, None] * self.Sigma + delta) / (
            self.c[:, None, None] + sw[:, None, None]
        )
        self.overall = self.Sigma.mean(0)
        self.mu, self.c = new_mu, new_c

    def update(self):
        eye = torch.eye(self.D, dtype=torch.float64)
        self.Lambda = torch.linalg.inv((1 - self.eps) * self.overall + self.eps * eye)

    def predict(self, X):  # [1, D] -> [1, C]
        M = self.mu.T  # [D, C]
        W = self.Lambda @ M
        return X @ W - 0.5 * (M * W).sum(0)


def dota_reference(scores, feats, class_weights, cfg: dict, model_cls=DotaReference):
    """(final logits [N, C], the final DotaReference) following run_test_dota."""
    model = model_cls(cfg, class_weights)
    outs = []
    for i in range(scores.shape[0]):
        logits, f = scores[i : i + 1], feats[i : i + 1]
        g = model.predict(f)
        weight = torch.clamp(cfg["rho"] * model.c.mean() / f.shape[0], max=cfg["eta"])
        outs.append((logits + weight * g)[0])
        model.fit(f, logits.softmax(1))
        model.update()
    return torch.stack(outs), model


def planted_stream(seed=0, N=400, C=10, D=32):
    """Features cluster tightly by class; base scores only slightly informative (a
    +1.5 bump on the true class under unit Gaussian noise)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.nn.functional.normalize(torch.randn(C, D, generator=g), dim=1)
    labels = torch.randint(0, C, (N,), generator=g)
    noise = 0.3 * torch.randn(N, D, generator=g) / D**0.5
    feats = torch.nn.functional.normalize(means[labels] + noise, dim=1)
    scores = 1.5 * torch.nn.functional.one_hot(labels, C) + torch.randn(N, C, generator=g)
    return AdaptBatch(scores, feats, means), labels
