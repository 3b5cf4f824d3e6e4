"""Evaluation of adapted scorers (:mod:`awt_engine.adapt`): replays over seeded orders.

During the pass over the images an adapted scorer only collects what its adaptation
reads (:class:`~awt_engine.adapt.scorer.Collected`: base scores and features per image),
so the model runs once and the image cache's order is free. Then:

* an **online** adaptation (TDA, DOTA) is replayed from a fresh state over ``orders``
  seeded permutations of the scored images (seed ``order_seed + k`` for run k, the
  permutation ``torch.randperm(N, generator=torch.Generator().manual_seed(seed))`` over
  the images ascending by input index): each run's metrics are kept, and the reported
  metrics are their mean (their standard deviation beside them);
* a **transductive** one (TransCLIP) is solved once: its result does not depend on order.

Out-of-distribution images (``eval --ood-root``) join the adaptation's stream: each run
is replayed a second time over the in-distribution and OOD images together (permuted by
the same seed), and the maximum class probability of each group gives ``ood_auroc`` and
``ood_fpr95``; the accuracy and calibration metrics come from the in-distribution-only
run, so they do not change when OOD images are added.

Axes: N images, M OOD images, C classes, D embedding width.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from awt_engine.adapt.base import AdaptBatch
from awt_engine.adapt.scorer import AdaptedScorer, Collected
from awt_engine.calibration import CONF, image_terms, max_prob, ood_metrics
from awt_engine.metrics import Metrics, metrics_from_topk, top_classes


@dataclass(frozen=True)
class AdaptedRun:
    """One replay of an adapted scorer: its order's seed (None: order-free) and results."""

    seed: int | None
    metrics: Metrics
    top5: Tensor  # [N, <=5] in ascending input index
    terms: Tensor  # [N, 4] calibration terms (awt_engine.calibration.image_terms)


def order_of(n: int, seed: int) -> Tensor:
    """The permutation [n] of run seed ``seed`` (positions in ascending input index)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def adapted_runs(
    s: AdaptedScorer,
    collected: Collected,
    labels_all: Tensor,
    scored: Tensor,
    n_failed: int,
    *,
    orders: int = 1,
    order_seed: int = 0,
    ood: Collected | None = None,
    memory_budget: int | None = None,
) -> list[AdaptedRun]:
    """The runs of ``s`` over the collected images that were scored (``scored`` [N]:
    ascending input indices; images that failed elsewhere are left out)."""
    wanted = set(scored.tolist())
    keep = torch.tensor([i in wanted for i in sorted(collected.indices)], dtype=torch.bool)
    seeds: list[int | None] = (
        [order_seed + k for k in range(orders)] if s.adaptation.online else [None]
    )
    idx, batch = collected.batch(keep)  # ascending input index, once for every run
    both = _with_ood(idx, batch, ood) if ood is not None else None
    labels = labels_all[torch.tensor(idx, dtype=torch.long)]
    runs = []
    for seed in seeds:
        order = order_of(len(idx), seed) if seed is not None else None
        scores = s.replay(batch, order, memory_budget)  # [N, C]
        _check_finite(s, scores)
        terms = image_terms(scores, labels)
        top = top_classes(scores)
        m = metrics_from_topk(top, labels, n_failed=n_failed, terms=terms)
        if both is not None:
            m = dataclasses.replace(m, **_ood_run(s, both, len(idx), seed, memory_budget))
        runs.append(AdaptedRun(seed, m, top, terms))
    return runs


def _with_ood(idx: list[int], batch: AdaptBatch, ood: Collected) -> AdaptBatch | None:
    """The in-distribution rows then the OOD images' (None when there are none)."""
    o_idx, o_batch = ood.batch()
    if not o_idx:
        return None
    return AdaptBatch(
        torch.cat([batch.scores, o_batch.scores]),
        torch.cat([batch.features, o_batch.features]),
        batch.class_features,
        batch.scale,
    )


def _ood_run(s: AdaptedScorer, both: AdaptBatch, n_id: int, seed, memory_budget) -> dict:
    """``ood_auroc`` / ``ood_fpr95`` of ``s`` replayed over the in-distribution images
    and the OOD images together (``both``: the first ``n_id`` rows in-distribution), in
    the run's seeded order over all of them."""
    order = order_of(both.n_images, seed) if seed is not None else None
    scores = s.replay(both, order, memory_budget)  # [N + M, C]
    _check_finite(s, scores)
    conf = max_prob(scores)  # [N + M]
    return ood_metrics(conf[:n_id], conf[n_id:])


def _check_finite(s: AdaptedScorer, scores: Tensor) -> None:
    if not torch.isfinite(scores).all():
        raise ValueError(
            f"adaptation {s.adaptation.name!r} gave scores that are not finite numbers; "
            f"check its options ({s.config})"
        )


def plain_ood(id_terms: Tensor, ood_conf: Tensor) -> dict:
    """OOD metrics of a plain scorer from its in-distribution terms [N, 4] and the OOD
    images' maximum class probabilities [M]."""
    return ood_metrics(id_terms[:, CONF], ood_conf)


def calibration_notes(metrics: dict[str, Metrics], scorers: dict) -> list[str]:
    """One line per adapted scorer whose expected calibration error is worse than its
    base scorer's by more than a point (test-time adaptation often makes a model more
    confident than it is accurate): what the eval report says below its table."""
    notes = []
    for name, s in scorers.items():
        if not isinstance(s, AdaptedScorer) or s.base.name not in metrics:
            continue
        mine, base = metrics[name].ece, metrics[s.base.name].ece
        if mine is not None and base is not None and mine > base + 0.01:
            notes.append(
                f"{name}: ECE {100 * mine:.2f}% against {100 * base:.2f}% for {s.base.name}: "
                "the adaptation made its probabilities less calibrated (--plots shows where)"
            )
    return notes


__all__ = [
    "AdaptedRun",
    "adapted_runs",
    "calibration_notes",
    "order_of",
    "plain_ood",
]
