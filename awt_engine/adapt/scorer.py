"""A base scorer with an adaptation on top, as one stateful :class:`~awt_engine.scorers.Scorer`.

``adapted_scorer("awt", "tda")`` is the scorer ``awt+tda``: for each batch the base scorer
gives its class scores ``[b, C]`` and the image features ``[b, D]`` the adaptation reads
(:meth:`~awt_engine.scorers.Scorer.image_features`: AWT's view-weighted mean, view 0 for
the CLIP baselines) with the class features ``[C, D]``; then

* an **online** adaptation steps through the batch's rows in order with the caller's state
  (:meth:`AdaptedScorer.new_state`), so the run loop keeps input order and the order is
  part of the record (``order_dependent``);
* a **transductive** one collects every image first (``needs_whole_set``): its state is a
  :class:`Collected` set; the run loop calls :meth:`AdaptedScorer.finish` once all images
  are in, and only then are scores known.

Evaluation collects for both kinds (:meth:`AdaptedScorer.collector`), so the model runs
once, images may come in any order (the image cache's), and an online adaptation is then
replayed over as many seeded orders of the set as asked (:meth:`AdaptedScorer.replay`).

Axes: b images in a batch (N: a whole set), C classes, D embedding width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from awt_engine.adapt.base import Adaptation, AdaptBatch, adapt_config, get_adaptation
from awt_engine.scorers import ScoreInput, ScoreOutput, Scorer, get_scorer
from awt_engine.scoring.config import AWTConfig


@dataclass
class Collected:
    """Images gathered for a whole-set solve or a replay: their input indices, the base
    scores and features (float32 on the CPU), and the class features and scale."""

    indices: list[int] = field(default_factory=list)  # [N]
    scores: list[Tensor] = field(default_factory=list)  # [b, C] per batch
    features: list[Tensor] = field(default_factory=list)  # [b, D] per batch
    class_features: Tensor | None = None  # [C, D]
    scale: float = 100.0

    def add(self, indices: tuple[int, ...] | None, part: AdaptBatch) -> None:
        if indices is None:
            raise ValueError("collecting a set needs each image's input index")
        self.indices.extend(indices)
        self.scores.append(part.scores.float().cpu())
        self.features.append(part.features.float().cpu())
        if self.class_features is None:
            self.class_features, self.scale = part.class_features.float().cpu(), part.scale

    def __len__(self) -> int:
        return len(self.indices)

    def batch(self, keep: Tensor | None = None) -> tuple[list[int], AdaptBatch]:
        """(indices, one AdaptBatch of every collected image), ascending by index; ``keep``
        [N] bool over that order drops images (ones that failed elsewhere)."""
        if len(set(self.indices)) != len(self.indices):
            raise ValueError("an image index was collected twice: one state per run")
        order = torch.tensor(self.indices, dtype=torch.long).argsort()
        scores, feats = torch.cat(self.scores)[order], torch.cat(self.features)[order]
        idx = [self.indices[i] for i in order.tolist()]
        if keep is not None:
            scores, feats = scores[keep], feats[keep]
            idx = [i for i, k in zip(idx, keep.tolist(), strict=True) if k]
        return idx, AdaptBatch(scores, feats, self.class_features, self.scale)


class AdaptedScorer(Scorer):
    """``base`` scores, then ``adaptation`` (with its ``config``) on top; see the module."""

    needs_embeddings = True
    needs_embeddings_reason = (
        "an adaptation reads image embeddings, and this model gives logits only (a "
        "generative model such as LLaMP or eP-ALM): use it without --adapt"
    )
    explains = False
    stateful = True

    def __init__(self, base: Scorer, adaptation: Adaptation, config):
        if isinstance(base, AdaptedScorer):
            raise ValueError(f"{base.name!r} is already adapted; adaptations do not stack")
        self.base, self.adaptation, self.config = base, adaptation, config
        self.name = f"{base.name}+{adaptation.name}"
        self.summary = f"{base.name}, then {adaptation.summary}"
        self.uses_views, self.uses_descriptions = base.uses_views, base.uses_descriptions
        self.order_dependent = adaptation.online
        self.needs_whole_set = not adaptation.online

    def new_state(self) -> Any:
        """The adaptation's fresh state (online), or an empty :class:`Collected` set."""
        return self.adaptation.new_state(self.config) if self.adaptation.online else Collected()

    def collector(self) -> Collected:
        """An empty set to collect into (evaluation, for either kind)."""
        return Collected()

    def part(self, inputs: ScoreInput, config: AWTConfig, memory_budget=None) -> AdaptBatch:
        """What the adaptation reads for these images: base scores, features, classes."""
        scores = self.base(inputs, config=config, memory_budget=memory_budget).scores
        feats = self.base.image_features(inputs, config)  # [b, D]
        return AdaptBatch(
            scores.float(), feats.float(), self.base.class_features(inputs).float(), inputs.scale
        )

    def __call__(self, inputs, *, config, memory_budget=None, state=None, explain=False):
        part = self.part(inputs, config, memory_budget)
        if isinstance(state, Collected):  # gathering: the base scores stand in for now
            state.add(inputs.indices, part)
            return ScoreOutput(part.scores)
        if not self.adaptation.online:
            raise ValueError(f"scorer {self.name!r} needs the whole set: give it a Collected state")
        if state is None:
            raise ValueError(f"scorer {self.name!r} keeps state: pass state=new_state()")
        return ScoreOutput(self.adaptation.step(part, state, self.config))

    def finish(self, state: Collected, memory_budget: int | None = None) -> dict[int, Tensor]:
        """A transductive solve over the collected set: input index -> scores [C]."""
        idx, batch = state.batch()
        if not idx:
            return {}
        scores = self.adaptation.solve(batch, self.config, memory_budget)  # [N, C]
        return dict(zip(idx, scores.float(), strict=True))

    def replay(
        self, batch: AdaptBatch, order: Tensor | None = None, memory_budget: int | None = None
    ) -> Tensor:
        """Scores [N, C] in ``batch``'s row order (:meth:`Collected.batch`): an online
        adaptation stepped through the rows in ``order`` (positions; default as given) from
        a fresh state, or the transductive solve (order-free)."""
        N = batch.n_images
        if N == 0:
            return torch.empty(0, batch.scores.shape[-1])
        if not self.adaptation.online:
            return self.adaptation.solve(batch, self.config, memory_budget).float()
        order = torch.arange(N) if order is None else order
        permuted = AdaptBatch(
            batch.scores[order], batch.features[order], batch.class_features, batch.scale
        )
        out = self.adaptation.step(permuted, self.adaptation.new_state(self.config), self.config)
        scores = torch.empty_like(out)
        scores[order] = out  # back to the batch's row order
        return scores.float()


def adapted_scorer(
    base: str | Scorer, adapt: str | Adaptation, options: dict[str, Any] | None = None
) -> AdaptedScorer:
    """The scorer ``base+adapt`` with the adaptation's options (``--set`` strings allowed)
    applied and checked; ValueError naming a bad scorer, adaptation or option."""
    a = get_adaptation(adapt)
    return AdaptedScorer(get_scorer(base), a, adapt_config(a, options))


def resolve_scorer(name: str | Scorer, adapt_options: dict[str, Any] | None = None) -> Scorer:
    """A scorer by name, where ``"awt+tda"`` names ``awt`` adapted by ``tda``."""
    if isinstance(name, str) and "+" in name:
        base, _, adapt = name.partition("+")
        return adapted_scorer(base, adapt, adapt_options)
    return get_scorer(name)


__all__ = ["AdaptedScorer", "Collected", "adapted_scorer", "resolve_scorer"]
