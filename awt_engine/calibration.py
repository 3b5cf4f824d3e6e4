"""Calibration metrics of classification probabilities (torch only; no model).

Evaluation never keeps an [N, C] matrix: :func:`image_terms` turns a batch of class
scores into four scalars per image, and :func:`calibration_metrics` computes every metric
from those [N] columns, so memory stays O(N).

Probabilities are the softmax of the class scores, in float32 as ``classify`` reports
them (with a shortlist, over the shortlisted classes; the others score ``-inf`` and get
probability 0). Sums are taken in float64.

Out-of-distribution detection (:func:`ood_metrics`) scores each image by its top-1
probability (MCM, the maximum concept matching score of Ming et al., NeurIPS 2022: the
CONF column of :func:`image_terms`, or :func:`max_prob`), in-distribution images being the
positives.

Axes: B images of a batch, C classes, N images (in-distribution), M images (OOD).
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
OOD_NAMES = ("ood_auroc", "ood_fpr95")
# FPR95: the share of in-distribution images kept, as the exact fraction 95/100 (compared
# in integers, so 19 of 20 counts as 95% whatever float rounding does)
TPR_NUM, TPR_DEN = 95, 100


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


def max_prob(scores: Tensor) -> Tensor:
    """scores [B, C] (logit scale) -> [B] float64 on the CPU: the top-1 softmax
    probability (float32 softmax, as :func:`image_terms`; its CONF column)."""
    return torch.softmax(scores.float(), dim=-1).amax(dim=-1).double().cpu()


def bin_index(conf: Tensor, n_bins: int = N_BINS) -> Tensor:
    """conf [N] -> [N] long: the equal-width bin of each confidence, bin b holding
    b/n < conf <= (b+1)/n (conf = 0 in bin 0; anything above 1 in the last bin)."""
    return (torch.ceil(conf.double() * n_bins).long() - 1).clamp(0, n_bins - 1)


def ece(conf: Tensor, correct: Tensor, n_bins: int = N_BINS) -> float:
    """conf [N], correct [N] -> expected calibration error over ``n_bins`` equal-width
    bins (:func:`bin_index`): sum_b |B|/N * |acc(B) - conf(B)|."""
    conf, correct = conf.double(), correct.double()
    b = bin_index(conf, n_bins)
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


def ood_metrics(id_conf: Tensor, ood_conf: Tensor) -> dict[str, float | None]:
    """id_conf [N], ood_conf [M] (higher = more in-distribution, e.g. the top-1 probability)
    -> ``ood_auroc`` and ``ood_fpr95``, in-distribution (ID) being the positive class.

    * ``ood_auroc``: P(an ID image scores above an OOD image), a tie counting 1/2 (the
      Mann-Whitney statistic / (N M), exact: counted with a binary search, O((N+M) log M)).
    * ``ood_fpr95``: the fraction of OOD images accepted (score >= t) at the largest
      threshold t that accepts at least 95% of the ID images; t is then the ceil(0.95 N)-th
      largest ID score, and every image tied with it is accepted. This is OpenOOD's
      ``fpr_recall`` (openood/evaluators/metrics.py: ID positive,
      ``sklearn.metrics.roc_curve(gt, conf)``, the first ROC point with ``tpr >= 0.95``),
      taken over every distinct threshold (sklearn's ``drop_intermediate`` may skip a
      collinear point and then reports a slightly larger FPR). MCM's own code (Hendrycks'
      ``fpr_and_fdr_at_recall``) instead takes the threshold whose TPR is *closest* to 0.95,
      which may keep fewer than 95%; OpenOOD v1.5's ``auc_and_fpr_recall`` treats OOD as
      positive (the fraction of ID images rejected when 95% of OOD images are), another
      quantity.

    Either set empty: both values None (nothing to separate). A NaN score: ValueError.
    """
    if id_conf.numel() == 0 or ood_conf.numel() == 0:
        return dict.fromkeys(OOD_NAMES)
    pos = id_conf.double().flatten().cpu().contiguous()  # [N]
    neg = ood_conf.double().flatten().cpu()  # [M]
    if pos.isnan().any() or neg.isnan().any():
        raise ValueError("ood_metrics: a confidence is NaN")
    N, M = pos.numel(), neg.numel()
    neg = torch.sort(neg).values  # [M] ascending
    below = torch.searchsorted(neg, pos, right=False)  # [N] #OOD < s
    upto = torch.searchsorted(neg, pos, right=True)  # [N] #OOD <= s
    wins2 = int((below + upto).sum())  # 2 * (#(ID > OOD) + #ties / 2), exact in int64
    k = -(-TPR_NUM * N // TPR_DEN)  # ceil(0.95 N): the fewest ID images kept, >= 1
    t = torch.sort(pos, descending=True).values[k - 1]
    accepted = M - int(torch.searchsorted(neg, t, right=False))  # #OOD >= t
    return {"ood_auroc": wins2 / (2 * N * M), "ood_fpr95": accepted / M}
