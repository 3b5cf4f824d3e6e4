"""What the batch worker does with a batch: views, one model call, per-request scores.

A batch holds images of several requests (:class:`Item`, each pointing to its request's
:class:`Job`: label set, scorer, views, top-k). For a batch the worker

1. makes each image's views exactly as ``classify`` does (:func:`~awt_engine.inputs.make_views`,
   seeded by the image's pixels, on the model's device), then lets go of its decoded pixels;
2. runs the image tower once per view count V in the batch (an Embedder's ``embed_views``
   -> ``[b, V, D]``), or for a LogitModel once per (V, label set) (``logits`` ->
   ``[b, V, C, P]``), since its logits need the labels;
3. scores each request's images against that request's label set with its scorer, through
   the run loop's own :meth:`~awt_engine.runner.Runner.score`; softmax and top-k as
   :meth:`~awt_engine.classifier.Classifier.classify` rows.

Every image's scores depend only on the image, its request's settings and the model, never
on the batch (DESIGN section 1.2). Results go back to each request's asyncio loop
thread-safely; a request that has gone (cancelled, timed out) is skipped.

Axes: b images in a batch, V views, C classes, P prompts, D embedding width, R input size.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from awt_engine.inputs.views import ViewConfig, make_views
from awt_engine.labels import LabelSet
from awt_engine.models.base import is_embedder
from awt_engine.runner import NONFINITE_REASON, ModelOutput, Runner, nonfinite_rows
from awt_engine.scorers import Scorer, check_logits
from awt_engine.serve.errors import ServeError
from awt_engine.serve.images import Hold

log = logging.getLogger(__name__)

CLASSIFY, EMBED = "classify", "embed"


@dataclass(eq=False)
class Job:
    """One request's settings, shared by its images."""

    kind: str  # CLASSIFY: score rows; EMBED: view-0 embeddings [D]
    view_config: ViewConfig
    labels: LabelSet | None = None  # what the scorer needs (bare without descriptions)
    scorer: Scorer | None = None
    class_embeds: Tensor | None = None  # [C, P, D] on the model's device (Embedder)
    top_k: int = 5

    def __post_init__(self) -> None:
        # images with equal keys are scored together, whichever requests they came from:
        # the same scorer against the same label set (scoring is per image, DESIGN 1.2)
        labels = self.labels.key() if self.labels is not None else ""
        scorer = self.scorer.name if self.scorer is not None else ""
        self.key = (self.kind, scorer, labels)


@dataclass(eq=False)
class Item:
    """One image of a request on its way through the queue."""

    job: Job
    image: Any  # RGB PIL image; None once its views are made
    hold: Hold | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    views: Tensor | None = field(default=None, repr=False)  # [V, 3, R, R] while batched


def deliver(item: Item, value: Any = None, exc: BaseException | None = None) -> None:
    """Hand ``value`` (or ``exc``) to the item's awaiting request, from any thread."""

    def settle() -> None:
        if item.future.done():  # the request was cancelled or timed out
            return
        if exc is not None:
            item.future.set_exception(exc)
        else:
            item.future.set_result(value)

    try:
        item.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed: nobody is waiting
        pass


class BatchRunner:
    """``runner(batch)``: the batch function of the :class:`~awt_engine.serve.batcher.Batcher`."""

    def __init__(self, clf):
        self.clf = clf
        self.model = clf.model
        self.embeds = is_embedder(clf.model)

    def __call__(self, batch: list[Item]) -> None:
        ready = [item for item in batch if self._make_views(item)]
        groups: dict[tuple, list[Item]] = defaultdict(list)
        for item in ready:
            V = item.views.shape[0]
            labels = None if self.embeds else item.job.key
            groups[(V, labels)].append(item)
        for items in groups.values():
            try:
                self._run_group(items)
            except Exception as exc:
                log.exception("model call on %d images failed", len(items))
                fail(items, ServeError(f"the model failed on this batch: {exc}"))
            finally:
                for item in items:
                    item.views = None

    def _make_views(self, item: Item) -> bool:
        """The item's views [V, 3, R, R] (as view_batches makes them); False with its error
        row delivered when it has none."""
        try:
            item.views = make_views(
                item.image, self.model.preprocess, item.job.view_config, device=self.model.device
            )
            return True
        except Exception as exc:
            reason = f"cannot make views: {exc}"
            if item.job.kind == EMBED:
                deliver(item, exc=ServeError(reason))
            else:
                deliver(item, {"error": reason})
            return False
        finally:
            item.image = None  # the decoded pixels are not kept past their views
            if item.hold is not None:
                item.hold.release()

    def _run_group(self, items: list[Item]) -> None:
        """Items of one V (and one label set for a LogitModel): one model call, then each
        request's images scored together."""
        views = torch.stack([item.views for item in items])  # [b, V, 3, R, R]
        scale = float(self.model.logit_scale)
        with torch.inference_mode():
            views = views.to(self.model.device)
            if self.embeds:
                out = ModelOutput(scale, image_embeds=self.model.embed_views(views))  # [b, V, D]
            else:
                labels = items[0].job.labels
                logits = self.model.logits(views, labels)  # [b, V, C, P]
                check_logits(logits, labels.n_classes, labels.n_prompts)
                out = ModelOutput(scale, logits=logits)
            by_key: dict[tuple, list[int]] = defaultdict(list)
            for b, item in enumerate(items):
                by_key[item.job.key].append(b)
            for rows in by_key.values():
                self._answer([items[b] for b in rows], _rows(out, rows))

    def _answer(self, items: list[Item], out: ModelOutput) -> None:
        job = items[0].job
        if job.kind == EMBED:
            img = out.image_embeds[:, 0].float().cpu()  # view 0: [b, D]
            for item, row in zip(items, img, strict=True):
                deliver(item, row.clone())
            return
        for item, row in zip(
            items, self._rows(job, out, [i.job.top_k for i in items]), strict=True
        ):
            deliver(item, row)

    def _rows(self, job: Job, out: ModelOutput, top_ks: list[int]) -> list[dict]:
        """{"labels", "scores"} (softmax probabilities, best first, ``top_ks[b]`` of them)
        or {"error"} per image."""
        clf = self.clf
        runner = Runner(
            self.model,
            job.labels,
            [job.scorer],
            awt_config=clf.awt_config,
            run_config=clf.run_config,
            class_embeddings=lambda _labels: job.class_embeds,
        )
        if self.embeds:
            out = ModelOutput(
                out.scale, image_embeds=out.image_embeds, class_embeds=job.class_embeds
            )
        scores = runner.score(out)[job.scorer.name].scores.float().cpu()  # [b, C]
        bad = nonfinite_rows(scores, clf.run_config.shortlist).tolist()
        probs = torch.softmax(scores, dim=-1)  # scores are on the logit scale
        C = probs.shape[-1]
        tops = {k: probs.topk(max(1, min(k, C)), dim=-1) for k in set(top_ks)}  # k: [b, k] x2
        classes = job.labels.classes
        rows = []
        for b, (k, nan) in enumerate(zip(top_ks, bad, strict=True)):
            vals, idx = tops[k]
            labels = [classes[j] for j in idx[b].tolist()]
            rows.append(
                {"error": NONFINITE_REASON}
                if nan
                else {"labels": labels, "scores": vals[b].tolist()}
            )
        return rows


def _rows(out: ModelOutput, rows: list[int]) -> ModelOutput:
    """The model output of the batch rows ``rows`` (one request's images)."""
    index = torch.tensor(
        rows, device=(out.image_embeds if out.logits is None else out.logits).device
    )
    if out.logits is not None:
        return ModelOutput(out.scale, logits=out.logits.index_select(0, index))
    return ModelOutput(out.scale, image_embeds=out.image_embeds.index_select(0, index))


def fail(items: list[Item], exc: BaseException) -> None:
    """Every item's request fails with ``exc`` (its views and pixels let go)."""
    for item in items:
        item.views = item.image = None
        if item.hold is not None:
            item.hold.release()
        deliver(item, exc=exc)


__all__ = ["CLASSIFY", "EMBED", "BatchRunner", "Item", "Job", "deliver", "fail"]
