"""The Python API: :func:`create_classifier` and the :class:`Classifier` it returns.

Images -> decode -> views (:mod:`awt_engine.inputs.batches`) -> the model -> a scorer
(:mod:`awt_engine.scorers`) -> class scores. Every image is scored on its own (views
seeded by the image's content, a per-image Sinkhorn stop), so results never depend on
batch size, order, or which images ran together.

What the numbers are:

* :meth:`Classifier.scores` gives raw class scores ``[B, C]`` on the model's logit
  scale (for AWT the transport-weighted logits, for ``clip`` ``scale * cosine``); with a
  shortlist, classes outside an image's shortlist score ``-inf``;
* :meth:`Classifier.predict` and :meth:`Classifier.classify` give, per image, the top
  labels with ``score`` = the softmax of those scores over the label set: a probability
  (over the shortlisted classes when a shortlist is used, the rest having probability 0).

Scores that come out non-finite (NaN or infinity: a diverged or absurd checkpoint, say)
are never returned as numbers: that image is an error (:data:`NONFINITE_REASON`), as an
unreadable one is, so no output ever holds a NaN.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from awt_engine._io import resolve_cache_root
from awt_engine._progress import progress_bar
from awt_engine.inputs import Failure, view_batches
from awt_engine.inputs.views import ViewConfig
from awt_engine.labels import LabelSet, resolve_label_set
from awt_engine.models.base import check_model, is_embedder, trained_info
from awt_engine.models.factory import DEFAULT_WEIGHTS, load_model
from awt_engine.scorers import (
    AWTConfig,
    Scorer,
    get_scorer,
    needs_embeddings_message,
    score,
)
from awt_engine.shortlist import shortlisted_scores
from awt_engine.text_cache import cached_class_embeddings

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
class Prediction:
    """One input's outcome: predictions best first, or the reason it failed."""

    path: str
    predictions: list[dict[str, Any]] | None  # [{"label": ..., "score": probability}, ...]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Classifier:
    """A model, a label set and a scorer; see :func:`create_classifier`."""

    def __init__(
        self,
        model,
        labels: LabelSet,
        *,
        scorer: str | Scorer = "awt",
        view_config: ViewConfig = ViewConfig(),
        awt_config: AWTConfig | None = None,
        batch_size: int = 4,
        workers: int = 2,
        memory_budget: int | None = None,
        shortlist: int | None = None,
        cache_root: str | Path | None = None,
        progress: bool = False,
    ):
        check_model(model)
        if shortlist is not None and shortlist < 1:
            raise ValueError(f"shortlist must be >= 1 classes, got {shortlist}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.model = model
        self.labels = labels
        self.scorer = get_scorer(scorer)
        self.base_view_config = view_config
        self.awt_config = awt_config or AWTConfig()
        self.batch_size = batch_size
        self.workers = workers
        self.memory_budget = memory_budget
        self.shortlist = shortlist
        if not is_embedder(model):
            if shortlist is not None:
                raise ValueError("--shortlist needs class embeddings; this model gives logits only")
            if self.scorer.needs_embeddings:
                raise ValueError(needs_embeddings_message(self.scorer))
        self.cache_root = Path(cache_root) if cache_root is not None else None
        self.progress = progress
        self._class_embeds: dict[str, Tensor] = {}  # LabelSet.key() -> [C, P, D]

    # -- what the scorers need ------------------------------------------------------------

    @property
    def classes(self) -> tuple[str, ...]:
        return self.labels.classes

    @property
    def view_config(self) -> ViewConfig:
        """The views this classifier's scorer needs (view 0 only for the CLIP baselines)."""
        return self.view_config_for([self.scorer])

    def view_config_for(self, scorers: Sequence[str | Scorer]) -> ViewConfig:
        n = max(get_scorer(s).views_needed(self.base_view_config.n_views) for s in scorers)
        return replace(self.base_view_config, n_views=n)

    def labels_for(self, scorers: Sequence[str | Scorer], labels: LabelSet | None = None):
        """``labels`` (default: the classifier's) without descriptions when no scorer uses
        them, so only the bare prompts are encoded."""
        labels = labels or self.labels
        uses = any(get_scorer(s).uses_descriptions for s in scorers)
        return labels if uses else labels.bare()

    def class_embeddings(self, labels: LabelSet | None = None) -> Tensor:
        """[C, P, D] on the model's device, computed once per label set (and cached on
        disk, keyed by the model's identity and the label set)."""
        labels = labels or self.labels_for([self.scorer])
        key = labels.key()
        if key not in self._class_embeds:
            with torch.inference_mode():
                embeds = cached_class_embeddings(
                    self.model, labels, self.cache_root, progress=self.progress
                )
            self._class_embeds[key] = embeds.to(self.model.device)
        return self._class_embeds[key]

    def set_class_embeddings(self, embeds: Tensor, labels: LabelSet | None = None) -> None:
        """Use ``embeds`` [C, P, D] (computed elsewhere, e.g. once for a Ray actor pool)
        as the class embeddings of ``labels`` (default: those this scorer needs)."""
        labels = labels or self.labels_for([self.scorer])
        if tuple(embeds.shape[:2]) != (labels.n_classes, labels.n_prompts):
            raise ValueError(
                f"class embeddings of shape {tuple(embeds.shape)} do not fit {labels.n_classes} "
                f"classes x {labels.n_prompts} prompts"
            )
        # a fresh copy: a tensor from elsewhere (Ray's object store, a file) may sit on
        # memory whose alignment makes BLAS round differently from a computed one
        self._class_embeds[labels.key()] = embeds.to(self.model.device).clone()

    @property
    def class_embeds(self) -> Tensor:
        return self.class_embeddings()

    # -- views to scores ------------------------------------------------------------------

    def embed_views(self, views: Tensor) -> Tensor:
        """[b, V, 3, R, R] -> [b, V, D], without autograd."""
        with torch.inference_mode():
            return self.model.embed_views(views.to(self.model.device))

    def logits(self, views: Tensor, labels: LabelSet) -> Tensor:
        """[b, V, 3, R, R] -> [b, V, C, P] from a :class:`LogitModel`."""
        from awt_engine.scorers import check_logits

        with torch.inference_mode():
            out = self.model.logits(views.to(self.model.device), labels)
        check_logits(out, labels.n_classes, labels.n_prompts)
        return out

    def scores_from_embeddings(
        self,
        image_embeds: Tensor,
        scorer: str | Scorer | None = None,
        *,
        class_embeds: Tensor | None = None,
    ) -> Tensor:
        """[B, V, D] -> [B, C] by ``scorer`` (default: this classifier's)."""
        s = get_scorer(scorer or self.scorer)
        txt = class_embeds if class_embeds is not None else self.class_embeddings()
        if not s.uses_descriptions:
            txt = txt[:, :1]

        def run(img: Tensor, t: Tensor) -> Tensor:
            return score(
                s,
                scale=self.model.logit_scale,
                image_embeds=img,
                class_embeds=t,
                config=self.awt_config,
                memory_budget=self.memory_budget,
            )

        image_embeds = image_embeds.to(txt.device)
        with torch.inference_mode():
            if self.shortlist is not None and self.shortlist < txt.shape[0]:
                return shortlisted_scores(run, image_embeds, txt, self.shortlist)
            return run(image_embeds, txt)

    def scores_from_logits(self, logits: Tensor, scorer: str | Scorer | None = None) -> Tensor:
        """[B, V, C, P] -> [B, C] by ``scorer`` (default: this classifier's)."""
        s = get_scorer(scorer or self.scorer)
        with torch.inference_mode():
            return score(
                s,
                scale=self.model.logit_scale,
                logits=logits,
                config=self.awt_config,
                memory_budget=self.memory_budget,
            )

    def scores_for_views(
        self, views: Tensor, scorers: Sequence[str | Scorer] | None = None, labels=None
    ) -> dict[str, Tensor]:
        """[b, V, 3, R, R] -> {scorer name: [b, C]}, the model run once for all scorers."""
        scorers = [get_scorer(s) for s in (scorers or [self.scorer])]
        if is_embedder(self.model):
            txt = self.class_embeddings(self.labels_for(scorers, labels))
            img = self.embed_views(views)
            return {s.name: self.scores_from_embeddings(img, s, class_embeds=txt) for s in scorers}
        logits = self.logits(views, self.labels_for(scorers, labels))
        return {s.name: self.scores_from_logits(logits, s) for s in scorers}

    # -- public calls -------------------------------------------------------------------

    def _batches(self, images: Iterable[Any]):
        return view_batches(
            images,
            self.model.preprocess,
            self.view_config,
            batch_size=self.batch_size,
            workers=self.workers,
            device=self.model.device,
        )

    def scores(self, images, *, candidate_labels: Sequence[str] | None = None) -> Tensor:
        """Raw class scores [B, C] (logit scale, see the module docstring) for images:
        paths, PIL images, numpy arrays or torch tensors. Raises ValueError for an
        unreadable one, or one whose scores are not finite (naming it)."""
        labels = self._candidates(candidate_labels)
        rows = []
        for item in self._batches(_as_list(images)):
            if isinstance(item, Failure):
                raise ValueError(f"{item.source}: {item.reason}")
            out = self.scores_for_views(item.views, labels=labels)[self.scorer.name]
            out = out.float().cpu()
            bad = nonfinite_rows(out, self.shortlist).tolist()
            if any(bad):
                raise ValueError(f"{item.sources[bad.index(True)]}: {NONFINITE_REASON}")
            rows.append(out)
        return torch.cat(rows)

    def _candidates(self, candidate_labels: Sequence[str] | None) -> LabelSet | None:
        if candidate_labels is None:
            return None
        if isinstance(candidate_labels, str):
            candidate_labels = [c.strip() for c in candidate_labels.split(",") if c.strip()]
        return self.labels.select(list(candidate_labels))

    def _top(self, scores: Tensor, top_k: int, classes: Sequence[str]) -> list[list[dict]]:
        probs = torch.softmax(scores.float(), dim=-1)  # scores are on the logit scale
        k = max(1, min(top_k, probs.shape[-1]))
        vals, idx = probs.topk(k, dim=-1)
        return [
            [{"label": classes[j], "score": float(v)} for v, j in zip(vr, ir, strict=True)]
            for vr, ir in zip(vals.tolist(), idx.tolist(), strict=True)
        ]

    def predict(
        self, images, top_k: int = 5, *, candidate_labels: Sequence[str] | None = None
    ) -> list:
        """Per image, ``[{"label": ..., "score": probability}, ...]`` best first.

        A single image gives a single list, as the Hugging Face zero-shot image
        classification pipeline does; ``candidate_labels`` (a list or a comma list)
        scores against those labels instead of the classifier's, as that pipeline's
        argument does (descriptions are kept when every candidate is a known class).
        """
        single = not isinstance(images, list | tuple)
        labels = self._candidates(candidate_labels)
        classes = labels.classes if labels is not None else self.classes
        preds = self._top(self.scores(images, candidate_labels=candidate_labels), top_k, classes)
        return preds[0] if single else preds

    def explain(self, image, top_k: int = 2):
        """An :class:`~awt_engine.explain.Explanation` of this image's scores: its views'
        boxes and weights, and for the ``top_k`` classes the prompt weights, transport plans
        and per-pair contributions (``exp.save("why.png")``, ``exp.to_html()``)."""
        from awt_engine.explain import explain

        return explain(self, image, top_k=top_k)

    def classify(
        self,
        inputs: Iterable[Any],
        *,
        top_k: int = 5,
        progress: bool | None = None,
        total: int | None = None,
    ) -> Iterator[Prediction]:
        """Stream :class:`Prediction` s for many inputs, decoding in parallel workers.

        An unreadable image, or one whose scores are not finite (:data:`NONFINITE_REASON`),
        yields a Prediction with ``error`` set; the run goes on.
        """
        bar = progress_bar(total, self.progress if progress is None else progress)
        try:
            for item in self._batches(inputs):
                if isinstance(item, Failure):
                    bar.update(1)
                    yield Prediction(item.source, None, item.reason)
                    continue
                scores = self.scores_for_views(item.views)[self.scorer.name].float().cpu()
                bad = nonfinite_rows(scores, self.shortlist).tolist()
                top = self._top(scores, top_k, self.classes)
                for source, preds, nan in zip(item.sources, top, bad, strict=True):
                    yield (
                        Prediction(source, None, NONFINITE_REASON)
                        if nan
                        else Prediction(source, preds)
                    )
                bar.update(len(item))
        finally:
            bar.close()


def _as_list(images) -> list:
    return list(images) if isinstance(images, list | tuple) else [images]


def _relabel(labels: LabelSet, template: str | None, descriptions: int | None) -> LabelSet:
    """A checkpoint's label set with another template or fewer descriptions."""
    if descriptions is not None and descriptions > labels.n_descriptions:
        raise ValueError(
            f"the checkpoint carries {labels.n_descriptions} descriptions per class; "
            f"--descriptions {descriptions} needs --dataset with a description cache"
        )
    n = labels.n_descriptions if descriptions is None else descriptions
    return LabelSet(
        labels.classes,
        template or labels.template,
        tuple(d[:n] for d in labels.descriptions) if n else (),
        labels.name,
        labels.descriptions_sha256 if n else None,
    )


def create_classifier(
    model: str | None = None,
    pretrained: str | None = DEFAULT_WEIGHTS,
    *,
    checkpoint: str | Path | None = None,
    llm: str | None = None,
    dataset: str | None = None,
    classes: Sequence[str] | str | None = None,
    template: str | None = None,
    descriptions: int | None = None,
    views: int | None = None,
    seed: int | None = None,
    frames: int | None = None,
    scorer: str = "awt",
    device: str = "auto",
    cache_dir: str | Path | None = None,
    batch_size: int = 4,
    workers: int = 2,
    precision: str | None = None,
    memory_budget: int | None = None,
    shortlist: int | None = None,
    embedder=None,
    awt_config: AWTConfig | None = None,
    view_config: ViewConfig | None = None,
    progress: bool = False,
    method: str | None = None,
) -> Classifier:
    """A ready classifier. Keyword names mirror ``awt-engine classify``'s options.

    model / pretrained: an open_clip model and weights (a pretrained tag, a checkpoint
    file, ``hf-hub:`` or ``local-dir:`` ids; ``pretrained=None`` or ``"none"`` means random
    weights); default ViT-B-16-quickgelu with OpenAI's weights, and with a ``checkpoint``
    the weights it was trained on. checkpoint: a trained method's
    ``.safetensors`` (``awt-engine train``); its model, classes and prompts are used unless
    ``dataset`` / ``classes`` name others. dataset: a registry name (``awt-engine datasets``) or a description-cache name.
    classes / template: an explicit label set (list, comma list or file) and prompt.
    descriptions: descriptions per class (default 50 with a data set, else 0).
    views: the image plus ``views - 1`` random crops (default 51, or ``view_config``'s);
    seed: the crops' seed (default 0, or ``view_config``'s).
    frames: frames sampled per video input (default 8, or ``view_config``'s).
    scorer: one of :func:`awt_engine.list_scorers`. embedder: use this model instead of
    loading ``model`` (any :class:`~awt_engine.models.base.Embedder` or ``LogitModel``).
    awt_config / view_config: the AWT hyper-parameters and the view settings, for the
    paper's ablations. shortlist: score only each image's K nearest classes (large label
    sets; changes results). memory_budget: bytes the scorer's blocks may use (results do
    not depend on it). ``method`` is the old name of ``scorer`` (deprecated).
    """
    if method is not None:
        import warnings

        warnings.warn(
            "create_classifier(method=...) is now scorer=...; method= will be removed",
            DeprecationWarning,
            stacklevel=2,
        )
        scorer = method
    get_scorer(scorer)
    view_config = view_config or ViewConfig()
    if views is not None:
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise ValueError(f"views must be an integer >= 1, got {views!r}")
        view_config = replace(view_config, n_views=views)
    if seed is not None:
        view_config = replace(view_config, seed=seed)
    if frames is not None:
        view_config = replace(view_config, frames=frames)
    root = resolve_cache_root(cache_dir)
    if embedder is None:
        embedder = load_model(
            model, pretrained, checkpoint=checkpoint, llm=llm, device=device, precision=precision
        )
    if cache_dir is not None and hasattr(embedder, "use_cache_root"):
        embedder.use_cache_root(root)  # a method's derived caches go there too (LLaMP's K/V)
    trained = trained_info(embedder)
    if trained is not None and dataset is None and classes is None:
        from awt_engine.checkpoints import labels_from_record

        labels = labels_from_record(trained.header["labels"])  # what it was trained on
        if template is not None or descriptions is not None:
            labels = _relabel(labels, template, descriptions)
    else:
        labels = resolve_label_set(dataset, classes, template, descriptions, root)
    why = embedder.unseen_classes(labels.classes) if hasattr(embedder, "unseen_classes") else None
    if why is not None:
        raise ValueError(why)
    return Classifier(
        embedder,
        labels,
        scorer=scorer,
        view_config=view_config,
        awt_config=awt_config,
        batch_size=batch_size,
        workers=workers,
        memory_budget=memory_budget,
        shortlist=shortlist,
        cache_root=root,
        progress=progress,
    )


__all__ = [
    "NONFINITE_REASON",
    "Classifier",
    "Prediction",
    "create_classifier",
    "load_model",
    "nonfinite_rows",
]
