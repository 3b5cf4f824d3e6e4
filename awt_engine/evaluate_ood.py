"""Out-of-distribution images in an evaluation (``eval --ood-root``): every scorer on
images of none of the classes, through the run loop.

A plain scorer's maximum class probability (MCM) per OOD image is kept; an adapted
scorer collects the OOD images' base scores and features, which
:mod:`awt_engine.evaluate_adapted` then replays together with the labelled images.

Axes: M OOD images, C classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from awt_engine.adapt.scorer import AdaptedScorer, Collected
from awt_engine.calibration import max_prob
from awt_engine.inputs import Failure, view_batches
from awt_engine.runner import NONFINITE_REASON, Runner, Scored, nonfinite_rows


@dataclass
class OODScores:
    conf: dict[str, Tensor]  # plain scorer -> [M] maximum class probability
    collected: dict[str, Collected]  # adapted scorer -> its OOD images' parts
    failed: list[tuple[str, str]]  # (path, reason)


def score_ood(clf, runner: Runner, paths, bar) -> OODScores:
    """Every scorer on the OOD images (no labels; through the run loop, input order)."""
    paths = [str(p) for p in paths]
    adapted = [s for s in runner.scorers if isinstance(s, AdaptedScorer)]
    collected = {s.name: s.collector() for s in adapted}
    confs: dict[str, list[Tensor]] = {s.name: [] for s in runner.scorers if s not in adapted}
    failed = []
    unusable: set[int] = set()  # input indices of images whose scores are not finite
    stream = view_batches(
        paths,
        clf.model.preprocess,
        clf.view_config_for(runner.scorers),
        batch_size=clf.batch_size,
        workers=clf.workers,
        device=clf.model.device,
    )
    for out in runner.run(stream, runner.new_states(dict(collected)), finish=False):
        bar.update(len(out) if isinstance(out, Scored) else 1)
        if isinstance(out, Failure):
            failed.append((out.source, out.reason))
            continue
        bad = torch.zeros(len(out), dtype=torch.bool)
        for sc in out.scores.values():
            bad |= nonfinite_rows(sc, clf.shortlist)
        for i, src, b in zip(out.indices, out.sources, bad.tolist(), strict=True):
            if b:
                failed.append((src, NONFINITE_REASON))
                unusable.add(i)
        for name in confs:
            confs[name].append(max_prob(out.scores[name][~bad]))
    for s in adapted:  # OOD images whose scores were not finite stay out of the stream
        _drop(collected[s.name], unusable)
    conf = {n: torch.cat(c) if c else torch.empty(0, dtype=torch.float64) for n, c in confs.items()}
    return OODScores(conf, collected, failed)


def _drop(collected: Collected, indices: set[int]) -> None:
    """Take images out of a collected set (in place)."""
    if not indices or not len(collected):
        return
    keep = [i not in indices for i in collected.indices]
    mask = torch.tensor(keep, dtype=torch.bool)
    scores, feats = torch.cat(collected.scores)[mask], torch.cat(collected.features)[mask]
    collected.indices = [i for i, k in zip(collected.indices, keep, strict=True) if k]
    collected.scores, collected.features = [scores], [feats]


__all__ = ["OODScores", "score_ood"]
