"""Calibration metrics of classification probabilities (torch only; no model).

Evaluation never keeps an [N, C] matrix: :func:`image_terms` turns a batch of class
scores into four scalars per image, and :func:`calibration_metrics` computes every metric
from those [N] columns, so memory stays O(N).

Probabilities are the softmax of the class scores, in float32 as ``classify`` reports
them (with a shortlist, over the shortlisted classes; the others score ``-inf`` and get
probability 0). Sums are taken in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

N_BINS = 15
# -log(p) of a true class with p = 0 (outside the shortlist, or a float32 softmax that
# underflowed) would be inf: p is clamped to the smallest positive normal float32
# (about 1.18e-38), so that image adds about 87.3 to the NLL sum and the NLL stays finite.
P_FLOOR = float(torch.finfo(torch.float32).tiny)
# columns of image_terms
CONF, CORRECT, P_TRUE, BRIER = 0, 1, 2, 3
NAMES = ("ece", "ece_adaptive", "nll", "brier", "aurc")


def image_terms(scores: Tensor, labels: Tensor) -> Tensor:
    """scores [B, C] (logit scale; ``-inf`` outside a shortlist), labels [B] ->
    [B, 4] float64: top-1 probability, correct (1.0/0.0), true-class probability, and
    the Brier term sum_c (p_c - onehot_c)^2.

    The prediction is ``scores.topk(1)``, the class top-1 accuracy counts.
    """
    probs = torch.softmax(scores.float(), dim=-1)
    labels = labels.to(scores.device).long()
    pred = scores.topk(1, dim=-1).indices[:, 0]
    conf = probs.gather(1, pred[:, None])[:, 0]
    p_true = probs.gather(1, labels[:, None])[:, 0]
    onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).double()
    brier = ((probs.double() - onehot) ** 2).sum(dim=-1)
    correct = (pred == labels).double()
    return torch.stack([conf.double(), correct, p_true.double(), brier], dim=1).cpu()


def ece(conf: Tensor, correct: Tensor, n_bins: int = N_BINS) -> float:
    """conf [N], correct [N] -> expected calibration error over ``n_bins`` equal-width
    bins: bin b holds b/n < conf <= (b+1)/n; sum_b |B|/N * |acc(B) - conf(B)|."""
    conf, correct = conf.double(), correct.double()
    b = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    gap = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, b, correct - conf)
    return float(gap.abs().sum() / conf.numel())  # |B|/N * |acc - conf| = |sum_B gap|/N


def ece_adaptive(conf: Tensor, correct: Tensor, n_bins: int = N_BINS) -> float:
    """conf [N], correct [N] -> ECE over ``n_bins`` equal-mass bins: images sorted by
    confidence (ties in item order) split into near-equal groups, the first N % n_bins
    one image larger (``torch.tensor_split``); with N < n_bins, one image per bin."""
    conf, correct = conf.double(), correct.double()
    order = torch.sort(conf, stable=True).indices
    total = 0.0
    for idx in torch.tensor_split(order, min(n_bins, conf.numel())):
        total += float((correct[idx] - conf[idx]).sum().abs())
    return total / conf.numel()


def aurc(conf: Tensor, correct: Tensor) -> float:
    """conf [N], correct [N] -> area under the selective risk-coverage curve.

    Images are sorted by confidence, highest first; the risk at coverage k/N is the
    errors among the k most confident over k, and AURC the mean over k = 1..N. Images of
    equal confidence have no order: within a tie group the errors are counted as spread
    evenly (their expected count over the group's orders), so the result is order-free.
    """
    conf, err = conf.double(), 1.0 - correct.double()
    order = torch.sort(conf, descending=True, stable=True).indices
    conf, err = conf[order], err[order]
    _, counts = torch.unique_consecutive(conf, return_counts=True)
    ends = counts.cumsum(0)
    cum_err = torch.cat([torch.zeros(1, dtype=torch.float64), err.cumsum(0)])
    group_err = cum_err[ends] - cum_err[ends - counts]
    before = cum_err[ends - counts]
    k = torch.arange(1, conf.numel() + 1, dtype=torch.float64)
    start = (ends - counts).repeat_interleave(counts).double()
    m = counts.repeat_interleave(counts).double()
    errs = before.repeat_interleave(counts) + (k - start) * group_err.repeat_interleave(counts) / m
    return float((errs / k).mean())


def calibration_metrics(terms: Tensor, n_bins: int = N_BINS) -> dict[str, float | None]:
    """terms [N, 4] from :func:`image_terms` -> ``ece``, ``ece_adaptive``, ``nll``,
    ``brier``, ``aurc``; all None when N = 0."""
    if terms.shape[0] == 0:
        return dict.fromkeys(NAMES)
    terms = terms.double()
    conf, correct = terms[:, CONF], terms[:, CORRECT]
    return {
        "ece": ece(conf, correct, n_bins),
        "ece_adaptive": ece_adaptive(conf, correct, n_bins),
        "nll": float(-torch.log(terms[:, P_TRUE].clamp_min(P_FLOOR)).mean()),
        "brier": float(terms[:, BRIER].mean()),
        "aurc": aurc(conf, correct),
    }
