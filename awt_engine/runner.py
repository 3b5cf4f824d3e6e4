"""The one run loop: view batches -> the model -> every scorer -> indexed score rows.

:func:`run` (and the :class:`Runner` behind it) sits below every caller that scores
images (:mod:`~awt_engine.classifier`, :mod:`~awt_engine.evaluate`,
:mod:`~awt_engine.explain`, training's evaluation, :mod:`~awt_engine.distributed`). It
takes :func:`awt_engine.inputs.view_batches` output as it is and is the one place that
knows the two kinds of model:

* an :class:`~awt_engine.models.base.Embedder` gives view embeddings ``[b, V, D]``,
  scored against the class embeddings ``[C, P, D]`` (optionally on each image's
  shortlist of classes);
* a :class:`~awt_engine.models.base.LogitModel` gives logits ``[b, V, C, P]``; a
  scorer that needs class embeddings, and the shortlist (which picks classes by their
  embeddings), are refused with the reason, never silently dropped.

Scorers that keep state get it from the caller (``states``: scorer name -> the state
object, made by :meth:`~awt_engine.scorers.Scorer.new_state` when not given), and the
loop scores batches in the order it receives them, which is input order. A scorer that
needs the whole set before scoring (transduction, :mod:`awt_engine.adapt`) collects
every batch into its state; the loop holds the scored rows (``[b, C]`` per scorer, never
the views) until the last batch, calls the scorer's ``finish(state)`` once, and then
yields every row with its final scores: with such a scorer nothing comes out before the
end.

Axes: b images in a batch, V views, C classes, P prompts, D embedding width.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from awt_engine.adapt.scorer import resolve_scorer
from awt_engine.inputs import Failure, ViewBatch
from awt_engine.labels import LabelSet
from awt_engine.models.base import is_embedder
from awt_engine.scorers import (
    ScoreInput,
    ScoreOutput,
    Scorer,
    check_logits,
    needs_embeddings_message,
)
from awt_engine.scoring.config import AWTConfig
from awt_engine.shortlist import shortlisted_output

NONFINITE_REASON = "scores are not finite (model weights diverged?)"


def nonfinite_rows(scores: Tensor, shortlist: int | None = None) -> Tensor:
    """[B, C] scores -> [B] bool: rows that are not usable numbers.

    A row is usable when every class has a finite score, or with a ``shortlist`` of K,
    when its K shortlisted classes do (the rest are ``-inf`` by design): NaN, ``+inf``
    or a shortlisted ``-inf`` makes the row unusable. The softmax of a usable row is
    always finite.
    """
    n_classes = scores.shape[-1]
    expected = n_classes if shortlist is None else min(shortlist, n_classes)
    finite = torch.isfinite(scores).sum(dim=-1)
    usable = (finite >= expected) & ~torch.isnan(scores).any(dim=-1)
    usable &= ~torch.isposinf(scores).any(dim=-1)
    return ~usable


@dataclass(frozen=True)
class ModelOutput:
    """What the model gave for a batch: embeddings, or logits."""

    scale: float  # the model's logit scale
    image_embeds: Tensor | None = None  # [b, V, D]
    class_embeds: Tensor | None = None  # [C, P, D]
    logits: Tensor | None = None  # [b, V, C, P]

    def pair_logits(self, b: int) -> Tensor:
        """Image b's logits [C, V, P], float64 on the CPU (explanations sum them exactly;
        an accelerator such as MPS may have no float64, so tensors move first)."""
        if self.logits is not None:
            return self.logits[b].cpu().double().permute(1, 0, 2)
        img = self.image_embeds[b].cpu().double()
        return self.scale * torch.einsum("vd,cpd->cvp", img, self.class_embeds.cpu().double())


@dataclass(frozen=True)
class Scored:
    """The scores of one batch of inputs, in input order."""

    indices: tuple[int, ...]  # [b] positions in the input stream
    sources: tuple[str, ...]
    scores: dict[str, Tensor]  # scorer name -> [b, C], float32 on the CPU

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class RunConfig:
    """How a run goes through its inputs; no setting but ``shortlist`` changes a result."""

    batch_size: int = 4  # images per model call: small, so a laptop CPU keeps up
    workers: int = 2  # decode threads: decoding overlaps the model with two
    memory_budget: int | None = None  # scorer block bytes; None: the device's default
    shortlist: int | None = None  # score each image's K nearest classes; None: all
    progress: bool = False  # a progress bar on stderr (library calls stay quiet)

    def __post_init__(self):
        if self.shortlist is not None and self.shortlist < 1:
            raise ValueError(f"shortlist must be >= 1 classes, got {self.shortlist}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


class Runner:
    """A model, a label set and the scorers to run, checked once against each other.

    ``class_embeddings(labels)`` gives ``[C, P, D]`` for an Embedder (the classifier's
    cache); it is not called for a LogitModel.
    """

    def __init__(
        self,
        model,
        labels: LabelSet,
        scorers: Sequence[str | Scorer],
        *,
        awt_config: AWTConfig = AWTConfig(),
        run_config: RunConfig = RunConfig(),
        class_embeddings: Callable[[LabelSet], Tensor] | None = None,
    ):
        self.model, self.labels = model, labels
        self.awt_config, self.run_config = awt_config, run_config
        self.scorers = [resolve_scorer(s) for s in scorers]
        self.embeds = is_embedder(model)  # the one place the two kinds differ
        check_run(model, self.scorers, run_config.shortlist)
        if self.embeds and class_embeddings is None:
            raise ValueError("an Embedder's run needs class_embeddings")
        self._class_embeddings = class_embeddings

    @property
    def in_order(self) -> bool:
        """Whether batches must be scored in input order (a stateful or order-dependent
        scorer): no cached-first reordering, no splitting across workers."""
        return any(s.stateful or s.order_dependent for s in self.scorers)

    def new_states(self, given: dict[str, Any] | None = None) -> dict[str, Any]:
        """``given`` (the caller's state objects, kept as they are) plus a fresh state for
        every other stateful scorer."""
        states = dict(given or {})
        for s in self.scorers:
            if s.stateful and states.get(s.name) is None:
                states[s.name] = s.new_state()
        return states

    def outputs(self, views: Tensor) -> ModelOutput:
        """[b, V, 3, R, R] -> the model's output, without autograd."""
        scale = float(self.model.logit_scale)
        with torch.inference_mode():
            if self.embeds:
                txt = self._class_embeddings(self.labels)
                img = self.model.embed_views(views.to(self.model.device))
                return ModelOutput(scale, image_embeds=img, class_embeds=txt)
            logits = self.model.logits(views.to(self.model.device), self.labels)
        check_logits(logits, self.labels.n_classes, self.labels.n_prompts)
        return ModelOutput(scale, logits=logits)

    def embedded(self, image_embeds: Tensor) -> ModelOutput:
        """View embeddings [b, V, D] from elsewhere (the image cache) as a model output."""
        txt = self._class_embeddings(self.labels)
        return ModelOutput(
            float(self.model.logit_scale), image_embeds=image_embeds, class_embeds=txt
        )

    def score(
        self,
        out: ModelOutput,
        indices: Sequence[int] | None = None,
        states: dict[str, Any] | None = None,
        *,
        explain: bool = False,
    ) -> dict[str, ScoreOutput]:
        """Every scorer's :class:`ScoreOutput` for a model output (``explain``: with the
        plans and weights the scorer has)."""
        states = states or {}
        idx = tuple(indices) if indices is not None else None
        return {
            s.name: self._score_one(s, out, idx, states.get(s.name), explain) for s in self.scorers
        }

    def _score_one(self, s: Scorer, out: ModelOutput, idx, state, explain) -> ScoreOutput:
        kw = dict(
            config=self.awt_config,
            memory_budget=self.run_config.memory_budget,
            state=state,
            explain=explain,
        )
        with torch.inference_mode():
            if out.logits is not None:
                return s(ScoreInput(out.scale, logits=out.logits, indices=idx), **kw)
            txt = out.class_embeds if s.uses_descriptions else out.class_embeds[:, :1]
            img = out.image_embeds.to(txt.device)
            k = self.run_config.shortlist
            if k is not None and k < txt.shape[0]:

                def call(i: Tensor, t: Tensor) -> ScoreOutput:
                    return s(ScoreInput(out.scale, i, t, indices=idx), **kw)

                return shortlisted_output(call, img, txt, k, explain=explain)
            return s(ScoreInput(out.scale, img, txt, indices=idx), **kw)

    def run(
        self,
        batches: Iterable[ViewBatch | Failure],
        states: dict[str, Any] | None = None,
        *,
        finish: bool = True,
    ) -> Iterator[Scored | Failure]:
        """Score each :class:`ViewBatch` as it comes; pass each :class:`Failure` on.

        With a whole-set scorer (and ``finish``), every item is held until the last batch,
        then the scorer's ``finish`` gives its scores and all items come out in the order
        they came in. ``finish=False``: the caller finishes (evaluation replays the
        collected set itself); that scorer's rows are then its stand-in scores."""
        states = self.new_states(states)
        whole = [s for s in self.scorers if s.needs_whole_set] if finish else []
        held: list[Scored | Failure] = []
        for item in batches:
            if isinstance(item, Failure):
                out: Scored | Failure = item
            else:
                scores = self.score(self.outputs(item.views), item.indices, states)
                rows = {name: o.scores.float().cpu() for name, o in scores.items()}
                out = Scored(tuple(item.indices), tuple(item.sources), rows)
            if whole:
                held.append(out)
            else:
                yield out
        if whole:
            yield from self._finished(held, whole, states)

    def _finished(self, held, whole: list[Scorer], states) -> Iterator[Scored | Failure]:
        """``held`` items with each whole-set scorer's rows replaced by its solve."""
        budget = self.run_config.memory_budget
        final = {s.name: s.finish(states[s.name], budget) for s in whole}  # index -> [C]
        for item in held:
            if isinstance(item, Scored):
                rows = dict(item.scores)
                for name, by_index in final.items():
                    rows[name] = torch.stack([by_index[i] for i in item.indices])
                item = Scored(item.indices, item.sources, rows)
            yield item


def check_run(model, scorers: Sequence[Scorer], shortlist: int | None) -> None:
    """ValueError, with the reason, for what the model and scorers cannot do together."""
    if shortlist is not None and shortlist < 1:
        raise ValueError(f"shortlist must be >= 1 classes, got {shortlist}")
    for s in scorers:
        if s.needs_whole_set and not hasattr(s, "finish"):
            raise ValueError(
                f"scorer {s.name!r} needs the whole set of images but has no finish(state) "
                "to score them once collected"
            )
        if s.stateful and shortlist is not None:
            raise ValueError(
                f"scorer {s.name!r} keeps state across images; --shortlist gives each image "
                "its own classes, so that state would mix class indices: drop --shortlist"
            )
    if is_embedder(model):
        return
    if shortlist is not None:
        raise ValueError(
            "--shortlist needs class embeddings; this model gives logits only (the "
            "shortlist picks each image's classes by their embeddings)"
        )
    for s in scorers:
        if s.needs_embeddings:
            raise ValueError(needs_embeddings_message(s))


def run(
    batches: Iterable[ViewBatch | Failure],
    model,
    labels: LabelSet,
    scorer: str | Scorer | Sequence[str | Scorer],
    state: Any = None,
    *,
    awt_config: AWTConfig = AWTConfig(),
    run_config: RunConfig = RunConfig(),
    class_embeddings: Callable[[LabelSet], Tensor] | None = None,
) -> Iterator[Scored | Failure]:
    """Score ``batches`` (:func:`~awt_engine.inputs.view_batches` output) with ``model``
    against ``labels`` by ``scorer`` (one, or a list: then ``state`` is a dict by
    scorer name). Yields :class:`Scored` rows (with their input indices) and
    :class:`Failure` s, in the order the batches come."""
    many = isinstance(scorer, list | tuple)
    scorers = list(scorer) if many else [scorer]
    runner = Runner(
        model,
        labels,
        scorers,
        awt_config=awt_config,
        run_config=run_config,
        class_embeddings=class_embeddings,
    )
    if many:
        states = state
    else:
        states = {runner.scorers[0].name: state} if state is not None else None
    return runner.run(batches, states)


__all__ = [
    "NONFINITE_REASON",
    "ModelOutput",
    "RunConfig",
    "Runner",
    "Scored",
    "check_run",
    "nonfinite_rows",
    "run",
]
