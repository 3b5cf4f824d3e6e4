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
from awt_engine.adapt.scorer import adapted_scorer, resolve_scorer
from awt_engine.inputs import Failure, view_batches
from awt_engine.inputs.views import ViewConfig
from awt_engine.labels import LabelSet, resolve_label_set
from awt_engine.models.base import check_model, trained_info
from awt_engine.models.factory import DEFAULT_WEIGHTS, load_model
from awt_engine.runner import NONFINITE_REASON, RunConfig, Runner, Scored, nonfinite_rows
from awt_engine.scorers import AWTConfig, Scorer
from awt_engine.text_cache import cached_class_embeddings


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
    """A model, a label set, a scorer and their settings, over the run loop
    (:mod:`awt_engine.runner`); see :func:`create_classifier`.

    ``run_config`` groups batch_size, workers, memory_budget, shortlist and progress
    (each also accepted as its own keyword, which wins).
    """

    def __init__(
        self,
        model,
        labels: LabelSet,
        *,
        scorer: str | Scorer = "awt",
        view_config: ViewConfig = ViewConfig(),
        awt_config: AWTConfig | None = None,
        run_config: RunConfig | None = None,
        batch_size: int | None = None,
        workers: int | None = None,
        memory_budget: int | None = None,
        shortlist: int | None = None,
        cache_root: str | Path | None = None,
        progress: bool | None = None,
    ):
        check_model(model)
        given = {
            "batch_size": batch_size,
            "workers": workers,
            "memory_budget": memory_budget,
            "shortlist": shortlist,
            "progress": progress,
        }
        self.run_config = replace(
            run_config or RunConfig(), **{k: v for k, v in given.items() if v is not None}
        )
        self.model = model
        self.labels = labels
        self.scorer = resolve_scorer(scorer)
        # a model may say how its test-time views are made (the AWT adapter: bicubic crops)
        hook = getattr(model, "eval_view_config", None)
        self.base_view_config = hook(view_config) if callable(hook) else view_config
        self.awt_config = awt_config or AWTConfig()
        self.runner_for([self.scorer])  # refuses what the model and scorer cannot do
        self.cache_root = Path(cache_root) if cache_root is not None else None
        self._class_embeds: dict[str, Tensor] = {}  # LabelSet.key() -> [C, P, D]

    batch_size = property(lambda self: self.run_config.batch_size)
    workers = property(lambda self: self.run_config.workers)
    memory_budget = property(lambda self: self.run_config.memory_budget)
    shortlist = property(lambda self: self.run_config.shortlist)
    progress = property(lambda self: self.run_config.progress)

    # -- what the scorers need ------------------------------------------------------------

    @property
    def classes(self) -> tuple[str, ...]:
        return self.labels.classes

    @property
    def view_config(self) -> ViewConfig:
        """The views this classifier's scorer needs (view 0 only for the CLIP baselines)."""
        return self.view_config_for([self.scorer])

    def view_config_for(self, scorers: Sequence[str | Scorer]) -> ViewConfig:
        n = max(resolve_scorer(s).views_needed(self.base_view_config.n_views) for s in scorers)
        return replace(self.base_view_config, n_views=n)

    def labels_for(self, scorers: Sequence[str | Scorer], labels: LabelSet | None = None):
        """``labels`` (default: the classifier's) without descriptions when no scorer uses
        them, so only the bare prompts are encoded."""
        labels = labels or self.labels
        uses = any(resolve_scorer(s).uses_descriptions for s in scorers)
        return labels if uses else labels.bare()

    def runner_for(
        self, scorers: Sequence[str | Scorer] | None = None, labels: LabelSet | None = None
    ) -> Runner:
        """The run loop for ``scorers`` (default: this classifier's) against ``labels``
        (default: the classifier's), with the label set those scorers need."""
        scorers = [resolve_scorer(s) for s in (scorers or [self.scorer])]
        return Runner(
            self.model,
            self.labels_for(scorers, labels),
            scorers,
            awt_config=self.awt_config,
            run_config=self.run_config,
            class_embeddings=self.class_embeddings,
        )

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

    def scores_for_views(
        self, views: Tensor, scorers: Sequence[str | Scorer] | None = None, labels=None
    ) -> dict[str, Tensor]:
        """[b, V, 3, R, R] -> {scorer name: [b, C]}, the model run once for all scorers."""
        runner = self.runner_for(scorers, labels)
        return {n: o.scores for n, o in runner.score(runner.outputs(views)).items()}

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

    def scores(
        self, images, *, candidate_labels: Sequence[str] | None = None, state: Any = None
    ) -> Tensor:
        """Raw class scores [B, C] (logit scale, see the module docstring) for images:
        paths, PIL images, numpy arrays or torch tensors. Raises ValueError for an
        unreadable one, or one whose scores are not finite (naming it). ``state``: a
        stateful scorer's state object (it is updated; default a fresh one)."""
        runner = self.runner_for(None, self._candidates(candidate_labels))
        rows = []
        for item in runner.run(self._batches(_as_list(images)), self._states(state)):
            if isinstance(item, Failure):
                raise ValueError(f"{item.source}: {item.reason}")
            out = item.scores[self.scorer.name]
            bad = nonfinite_rows(out, self.shortlist).tolist()
            if any(bad):
                raise ValueError(f"{item.sources[bad.index(True)]}: {NONFINITE_REASON}")
            rows.append(out)
        return torch.cat(rows)

    def _states(self, state: Any) -> dict[str, Any] | None:
        return None if state is None else {self.scorer.name: state}

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
        self,
        images,
        top_k: int = 5,
        *,
        candidate_labels: Sequence[str] | None = None,
        state: Any = None,
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
        scores = self.scores(images, candidate_labels=candidate_labels, state=state)
        preds = self._top(scores, top_k, classes)
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
        state: Any = None,
    ) -> Iterator[Prediction]:
        """Stream :class:`Prediction` s for many inputs, decoding in parallel workers.

        An unreadable image, or one whose scores are not finite (:data:`NONFINITE_REASON`),
        yields a Prediction with ``error`` set; the run goes on. ``state``: a stateful
        scorer's state object (updated in input order; default a fresh one).
        """
        bar = progress_bar(total, self.progress if progress is None else progress)
        try:
            for item in self.runner_for().run(self._batches(inputs), self._states(state)):
                if isinstance(item, Failure):
                    bar.update(1)
                    yield Prediction(item.source, None, item.reason)
                    continue
                yield from self._predictions(item, top_k)
                bar.update(len(item))
        finally:
            bar.close()

    def _predictions(self, item: Scored, top_k: int) -> Iterator[Prediction]:
        scores = item.scores[self.scorer.name]
        bad = nonfinite_rows(scores, self.shortlist).tolist()
        top = self._top(scores, top_k, self.classes)
        for source, preds, nan in zip(item.sources, top, bad, strict=True):
            yield Prediction(source, None, NONFINITE_REASON) if nan else Prediction(source, preds)


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
    scorer: str | Scorer = "awt",
    device: str = "auto",
    cache_dir: str | Path | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    precision: str | None = None,
    memory_budget: int | None = None,
    shortlist: int | None = None,
    embedder=None,
    awt_config: AWTConfig | None = None,
    view_config: ViewConfig | None = None,
    progress: bool | None = None,
    method: str | None = None,
    run_config: RunConfig | None = None,
    adapt: str | None = None,
    adapt_options: dict[str, Any] | None = None,
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
    adapt: a test-time adaptation on top of the scorer (``tda``, ``dota`` online: images
    are scored in the order given, each one updating the state; ``transclip``
    transductive: scores come once every image is in), with ``adapt_options`` (option name
    -> value, as ``--set``); see :mod:`awt_engine.adapt`.

    The settings group into the config objects: ``view_config`` (views, seed, frames),
    ``awt_config`` and ``run_config`` (:class:`~awt_engine.runner.RunConfig`: batch_size
    4, workers 2, memory_budget, shortlist, progress); a keyword given on its own
    overrides its config's field.
    """
    if method is not None:
        import warnings

        warnings.warn(
            "create_classifier(method=...) is now scorer=...; method= will be removed",
            DeprecationWarning,
            stacklevel=2,
        )
        scorer = method
    # checked before any model loads: the scorer, the adaptation and its options
    scorer = adapted_scorer(scorer, adapt, adapt_options) if adapt else resolve_scorer(scorer)
    view_config = _view_config(view_config, views, seed, frames)
    run_config = replace(
        run_config or RunConfig(),
        **_given(
            batch_size=batch_size,
            workers=workers,
            memory_budget=memory_budget,
            shortlist=shortlist,
            progress=progress,
        ),
    )
    root = resolve_cache_root(cache_dir)
    if embedder is None:
        embedder = load_model(
            model,
            pretrained,
            checkpoint=checkpoint,
            llm=llm,
            device=device,
            precision=precision,
            cache_root=root,
        )
    if cache_dir is not None and hasattr(embedder, "use_cache_root"):
        embedder.use_cache_root(root)  # a method's derived caches go there too (LLaMP's K/V)
    labels = _labels_of(embedder, dataset, classes, template, descriptions, root)
    return Classifier(
        embedder,
        labels,
        scorer=scorer,
        view_config=view_config,
        awt_config=awt_config,
        run_config=run_config,
        cache_root=root,
    )


def _given(**settings) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if v is not None}


def _view_config(
    view_config: ViewConfig | None, views: int | None, seed: int | None, frames: int | None
) -> ViewConfig:
    """``view_config`` (default ViewConfig()) with the views, seed and frames given."""
    if views is not None and (isinstance(views, bool) or not isinstance(views, int) or views < 1):
        raise ValueError(f"views must be an integer >= 1, got {views!r}")
    return replace(view_config or ViewConfig(), **_given(n_views=views, seed=seed, frames=frames))


def _labels_of(embedder, dataset, classes, template, descriptions, root) -> LabelSet:
    """The label set: a checkpoint's own (unless a data set or classes are named), else
    the one named; ValueError when a trained model cannot score these classes."""
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
    return labels


__all__ = [
    "NONFINITE_REASON",
    "Classifier",
    "Prediction",
    "RunConfig",
    "create_classifier",
    "load_model",
    "nonfinite_rows",
]
