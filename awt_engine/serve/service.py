"""The framework-free core of ``awt-engine serve``: :class:`ClassifyService`.

A loaded :class:`~awt_engine.classifier.Classifier` answering requests from an asyncio
event loop (uvicorn's), with images of concurrent requests batched together (issue 20):

```
classify(images, labels, template, top_k, scorer, views)   (any number of concurrent calls)
  │ checks: image and label counts, scorer, template, views  -> ServeError (400/413/422)
  │ label set: the classifier's, or labels.select(...) with the request's template;
  │            embedded once on the worker, kept in a bounded LRU (labelsets.py)
  │ decode:    bytes -> RGB on a small thread pool, under the pixel budget (images.py);
  │            an unreadable image is its own error row
  ▼ Items (image + its request's Job) into the Batcher's bounded queue (batcher.py)
  │ worker thread: up to max_batch images or max_wait_ms; views, one model call per V,
  │                each request's images scored with its own labels and scorer (worker.py)
  ▼ one row per image, in order: {"labels", "scores"} or {"error"}
```

A request's rows equal ``Classifier.classify``'s for the same images, labels and settings
(views are seeded by each image's pixels; scoring is per image). Request-level problems
raise :mod:`~awt_engine.serve.errors` subclasses with their HTTP status; a full queue is
503; a request over ``timeout`` is 504 with its queued images dropped, as are those of a
request whose awaiting task is cancelled (client gone): counted in ``images_dropped``.

Axes: n images or texts of a request, C classes, P prompts, D embedding width.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from awt_engine.adapt.scorer import resolve_scorer
from awt_engine.labels import LabelSet
from awt_engine.models.base import is_embedder
from awt_engine.runner import check_run
from awt_engine.scorers import Scorer
from awt_engine.serve.batcher import Batcher
from awt_engine.serve.config import ServeConfig
from awt_engine.serve.errors import (
    BadRequest,
    QueueFull,
    ServeError,
    Timeout,
    TooLarge,
    Unprocessable,
)
from awt_engine.serve.images import Decoded, Holds, PixelBudget, decode_image
from awt_engine.serve.labelsets import LabelSetCache
from awt_engine.serve.worker import CLASSIFY, EMBED, BatchRunner, Item, Job, fail
from awt_engine.text_cache import cached_class_embeddings


class ClassifyService:
    """A classifier serving concurrent requests through one batching worker thread."""

    def __init__(self, clf, config: ServeConfig | None = None):
        self.clf = clf
        self.config = config or ServeConfig()
        self.model = clf.model
        self.embeds = is_embedder(clf.model)
        self.model_name = str(getattr(clf.model, "identity", type(clf.model).__name__))
        why = _unservable(clf.scorer)
        if why is not None:
            raise ValueError(why)
        self._budget = PixelBudget(self.config.pixel_budget)
        self._labels = LabelSetCache(self.config.label_cache, self._embed_labels)
        self._batcher = Batcher(
            BatchRunner(clf),
            max_batch=self.config.max_batch,
            max_wait=self.config.max_wait,
            max_queue=self.config.max_queue,
            on_error=lambda batch, exc: fail(batch, ServeError(f"the batch failed: {exc}")),
        )
        self._pool: ThreadPoolExecutor | None = None
        self._ready = False
        self._lock = threading.Lock()
        self._dropped = 0

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker and the decode threads, embed the default label set; then ready."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                self.config.decode_workers, thread_name_prefix="awt-serve-decode"
            )
        self._batcher.start()
        if self.embeds:
            default = self.clf.labels_for([self.clf.scorer])
            embeds = self._batcher.call(lambda: self.clf.class_embeddings(default)).result()
            self._labels.pin(default, embeds)
        self._ready = True

    @property
    def ready(self) -> bool:
        return self._ready and self._batcher.accepting

    def stop(self, drain: bool = True) -> None:
        """Refuse new work (QueueFull, 503), finish the queued images (``drain``; else they
        fail with QueueFull) and join the worker."""
        self._ready = False
        left = self._batcher.stop(drain)
        self._count_dropped(len(left))
        fail(left, QueueFull("the server stopped before this image was scored"))
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def stats(self) -> dict[str, Any]:
        """queue_depth, batches (size -> count), label-cache hits/misses/size, images_dropped,
        decoded_bytes (held in the pixel budget now)."""
        with self._lock:
            dropped = self._dropped
        return {
            "queue_depth": self._batcher.depth,
            "batches": self._batcher.sizes(),
            **self._labels.stats(),
            "images_dropped": dropped,
            "decoded_bytes": self._budget.used,
        }

    # -- requests -------------------------------------------------------------------------

    async def classify(
        self,
        images: list[bytes],
        *,
        labels: list[str] | None = None,
        template: str | None = None,
        top_k: int = 5,
        scorer: str | None = None,
        views: int | None = None,
    ) -> list[dict]:
        """One row per image, in order: ``{"labels": [...], "scores": [...]}`` (softmax
        probabilities, best first) or ``{"error": reason}`` for an unusable image."""
        self._check_open()
        self._check_images(images)
        the_scorer = self._scorer(scorer)
        label_set = self.clf.labels_for([the_scorer], self._label_set(labels, template))
        n_views = the_scorer.views_needed(self._views(views))
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise Unprocessable(f"top_k must be a whole number >= 1, got {top_k!r}")
        job = Job(
            CLASSIFY,
            replace(self.clf.base_view_config, n_views=n_views),
            label_set,
            the_scorer,
            top_k=top_k,
        )

        async def run() -> list[dict]:
            if self.embeds:
                job.class_embeds = await self._class_embeds(label_set)
            return await self._run_images(job, images)

        return await self._within_timeout(run())

    async def embed_images(self, images: list[bytes]) -> Tensor:
        """[n, D] L2-normalised view-0 embeddings (Unprocessable for an unreadable image)."""
        self._check_open()
        self._check_images(images)
        if not self.embeds:
            raise Unprocessable("this model gives logits only; it has no image embeddings")
        job = Job(EMBED, replace(self.clf.base_view_config, n_views=1))
        rows = await self._within_timeout(self._run_images(job, images))
        for i, row in enumerate(rows):
            if isinstance(row, dict):
                raise Unprocessable(f"image {i}: {row['error']}")
        return torch.stack(rows)  # [n, D]

    async def embed_texts(self, texts: list[str]) -> Tensor:
        """[n, D] L2-normalised embeddings of ``texts`` by the model's text tower."""
        self._check_open()
        if isinstance(texts, str) or not isinstance(texts, list | tuple) or not texts:
            raise BadRequest("input must be a non-empty list of strings")
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise Unprocessable("every input must be a non-empty string")
        if len(texts) > self.config.max_labels:
            raise Unprocessable(
                f"{len(texts)} texts; the most per request is {self.config.max_labels}"
            )
        fut = self._batcher.call(lambda: self._text_tower(list(texts)))
        return await self._within_timeout(asyncio.shield(asyncio.wrap_future(fut)))

    # -- checks ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self.ready:
            raise QueueFull("the server is not ready (starting or stopping)")

    def _check_images(self, images: list[bytes]) -> None:
        if isinstance(images, bytes | str) or not isinstance(images, list | tuple):
            raise BadRequest("images must be a list of image bytes")
        if not images:
            raise BadRequest("no images in the request")
        if len(images) > self.config.max_images:
            raise TooLarge(
                f"{len(images)} images; the most per request is {self.config.max_images}"
            )

    def _scorer(self, name: str | None) -> Scorer:
        if name is None:
            return self.clf.scorer
        try:
            scorer = resolve_scorer(name)
            check_run(self.model, [scorer], self.clf.run_config.shortlist)
        except (ValueError, KeyError) as exc:
            raise Unprocessable(_message(exc)) from None
        why = _unservable(scorer)
        if why is not None:
            raise Unprocessable(why)
        return scorer

    def _label_set(self, labels: list[str] | None, template: str | None) -> LabelSet:
        """The request's label set: the classifier's, or ``select`` of the given labels
        (descriptions kept when all are known classes), with ``template`` when given."""
        base = self.clf.labels
        try:
            if labels is not None:
                if isinstance(labels, str) or not isinstance(labels, list | tuple):
                    raise Unprocessable("labels must be a list of strings")
                if len(labels) > self.config.max_labels:
                    raise Unprocessable(
                        f"{len(labels)} labels; the most per request is {self.config.max_labels}"
                    )
                if not labels or not all(isinstance(c, str) for c in labels):
                    raise Unprocessable("labels must be a non-empty list of strings")
                base = base.select([c.strip() for c in labels])
            if template is not None:
                if not isinstance(template, str):
                    raise Unprocessable("template must be a string with one {}")
                base = replace(base, template=template)
        except ValueError as exc:
            raise Unprocessable(_message(exc)) from None
        return base

    def _views(self, views: int | None) -> int:
        base = self.clf.base_view_config.n_views
        if views is None:
            return base
        most = self.config.max_views or base
        if isinstance(views, bool) or not isinstance(views, int) or not 1 <= views <= most:
            raise Unprocessable(f"views must be a whole number from 1 to {most}, got {views!r}")
        return views

    # -- the work -------------------------------------------------------------------------

    async def _within_timeout(self, awaitable):
        try:
            async with asyncio.timeout(self.config.timeout):
                return await awaitable
        except TimeoutError:
            raise Timeout(
                f"the request took over {self.config.timeout:g} s; its queued images were dropped"
            ) from None

    async def _class_embeds(self, labels: LabelSet) -> Tensor:
        """[C, P, D] of ``labels``: from the LRU, or embedded on the worker thread."""
        fut = self._labels.future(labels, self._batcher.call)
        try:
            return await asyncio.shield(asyncio.wrap_future(fut))
        except ValueError as exc:
            raise Unprocessable(f"cannot embed these labels: {_message(exc)}") from None

    def _embed_labels(self, labels: LabelSet) -> Tensor:
        """[C, P, D] on the model's device (on the worker thread; through the text cache)."""
        with torch.inference_mode():
            embeds = cached_class_embeddings(self.model, labels, self.clf.cache_root)
        return embeds.to(self.model.device)

    def _text_tower(self, texts: list[str]) -> Tensor:
        """[n, D] unit rows: the backbone's text encoder, else the model's ``embed_texts``."""
        backbone = getattr(self.model, "backbone", None)
        with torch.inference_mode():
            if backbone is not None and hasattr(backbone, "encode_text"):
                out = backbone.encode_text(texts)  # [n, D]
            elif hasattr(self.model, "embed_texts"):
                out = self.model.embed_texts([[t] for t in texts])[:, 0]  # [n, 1, D] -> [n, D]
            else:
                raise Unprocessable("this model has no text tower to embed texts with")
            return F.normalize(out.float(), dim=-1).cpu()

    async def _run_images(self, job: Job, images: list[bytes]) -> list[Any]:
        """Decode, queue and await ``images`` of one request: one result per image, in
        order (an unusable image's error row in its place)."""
        loop = asyncio.get_running_loop()
        holds = Holds(self._budget)
        items: list[Item] = []
        try:
            R = self.model.preprocess.size
            decoded = await asyncio.gather(
                *(
                    loop.run_in_executor(self._pool, decode_image, data, i, R, holds)
                    for i, data in enumerate(images)
                )
            )
            rows: list[Any] = []  # None where an item's result goes, else its error row
            for d in decoded:
                if isinstance(d, Decoded):
                    items.append(Item(job, d.image, d.hold, loop.create_future(), loop))
                rows.append(None if isinstance(d, Decoded) else {"error": d})
            decoded.clear()  # the pixels live in the items only: the worker lets them go
            self._batcher.submit(items)
            done = iter(await asyncio.gather(*(item.future for item in items)))
            items = []  # all answered: nothing left to take back
            return [next(done) if r is None else r for r in rows]
        finally:
            if items:  # ended early (cancelled, timed out, an error): take back the queued
                self._count_dropped(self._batcher.discard(items))
            holds.close()

    def _count_dropped(self, n: int) -> None:
        with self._lock:
            self._dropped += n


def _unservable(scorer: Scorer) -> str | None:
    """Why a scorer cannot answer requests independently, or None."""
    if scorer.stateful or scorer.order_dependent or scorer.needs_whole_set:
        return (
            f"scorer {scorer.name!r} keeps state across images or needs a whole set; a "
            "request's answer must not depend on other requests: serve a plain scorer"
        )
    return None


def _message(exc: BaseException) -> str:
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


__all__ = [
    "BadRequest",
    "ClassifyService",
    "QueueFull",
    "ServeConfig",
    "ServeError",
    "Timeout",
    "TooLarge",
    "Unprocessable",
]
