"""Evaluation metrics: top-1, top-5, mean per-class recall, calibration (from
:mod:`awt_engine.calibration`) and their mean and spread over several runs (the seeded
orders of an online adaptation).

Axes: N images, C classes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from torch import Tensor

from awt_engine.calibration import calibration_metrics, image_terms


@dataclass(frozen=True)
class Metrics:
    """Accuracies as exact fractions of counts; None where a metric is not defined."""

    acc1: float | None  # None when no image was scored
    acc5: float | None  # None also when there are fewer than 5 classes (as CLIP_benchmark)
    mean_per_class_recall: float | None
    n_images: int  # images scored
    n_failed: int  # images that could not be read or scored (not in the metrics)
    per_class_recall: dict[int, float] = field(default_factory=dict)  # label -> top-1 recall
    # calibration of the softmax probabilities (awt_engine.calibration); None: no image
    ece: float | None = None
    ece_adaptive: float | None = None
    nll: float | None = None
    brier: float | None = None
    aurc: float | None = None
    # out-of-distribution detection by the maximum class probability (eval --ood-root)
    ood_auroc: float | None = None
    ood_fpr95: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return {
            "acc1": self.acc1,
            "acc5": self.acc5,
            "mean_per_class_recall": self.mean_per_class_recall,
            "ece": self.ece,
            "ece_adaptive": self.ece_adaptive,
            "nll": self.nll,
            "brier": self.brier,
            "aurc": self.aurc,
            "ood_auroc": self.ood_auroc,
            "ood_fpr95": self.ood_fpr95,
        }


def compute_metrics(scores: Tensor, labels: Tensor, n_failed: int = 0) -> Metrics:
    """scores [N, C], labels [N] -> top-1, top-5, mean per-class recall.

    Mean per-class recall averages the top-1 recall of the classes that have images.
    """
    return metrics_from_topk(
        top_classes(scores), labels, n_failed, terms=image_terms(scores, labels)
    )


def top_classes(scores: Tensor, k: int = 5) -> Tensor:
    """Indices [N, min(k, C)] of the best classes, best first: all the metrics need."""
    return scores.topk(min(k, scores.shape[-1]), dim=-1).indices


def metrics_from_topk(
    top: Tensor, labels: Tensor, n_failed: int = 0, k: int = 5, terms: Tensor | None = None
) -> Metrics:
    """Metrics from :func:`top_classes` output [N, min(k, C)] and labels [N]; with
    ``terms`` [N, 4] (:func:`~awt_engine.calibration.image_terms`), calibration too.

    Fractions are computed from integer counts (1 of 3 is 1/3, not a float32 mean).
    Top-k needs at least k classes: with fewer it is None, as CLIP_benchmark leaves it
    undefined rather than reporting a trivial 1.0.
    """
    N = top.shape[0]
    if N == 0:
        return Metrics(None, None, None, 0, n_failed)
    hit1 = top[:, 0] == labels
    n1 = int(hit1.sum())
    acc5 = int((top == labels[:, None]).any(dim=-1).sum()) / N if top.shape[1] >= k else None
    per_class = {}
    for c in labels.unique().tolist():
        mask = labels == c
        per_class[c] = int(hit1[mask].sum()) / int(mask.sum())
    mean_recall = sum(per_class.values()) / len(per_class)
    calib = calibration_metrics(terms) if terms is not None else {}
    return Metrics(n1 / N, acc5, mean_recall, N, n_failed, per_class, **calib)


NUMBERS = (
    "acc1",
    "acc5",
    "mean_per_class_recall",
    "ece",
    "ece_adaptive",
    "nll",
    "brier",
    "aurc",
    "ood_auroc",
    "ood_fpr95",
)


def mean_metrics(runs: list[Metrics]) -> Metrics:
    """The mean of several runs' metrics over the same images (each number, and each
    class's recall; None stays None). One run is returned as it is."""
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    means = {}
    for name in NUMBERS:
        values = [getattr(r, name) for r in runs]
        means[name] = None if any(v is None for v in values) else math.fsum(values) / len(runs)
    recall = {
        c: math.fsum(r.per_class_recall[c] for r in runs) / len(runs)
        for c in first.per_class_recall
    }
    return dataclasses.replace(first, per_class_recall=recall, **means)


def metrics_std(runs: list[Metrics]) -> dict[str, float | None]:
    """Per metric, the standard deviation over runs (population, n in the denominator:
    the runs are all the orders asked for); None where a run has none or for one run."""
    out = {}
    for name in NUMBERS:
        values = [getattr(r, name) for r in runs]
        if len(runs) < 2 or any(v is None for v in values):
            out[name] = None
            continue
        mean = math.fsum(values) / len(values)
        out[name] = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
    return out


__all__ = [
    "Metrics",
    "compute_metrics",
    "mean_metrics",
    "metrics_from_topk",
    "metrics_std",
    "top_classes",
]
