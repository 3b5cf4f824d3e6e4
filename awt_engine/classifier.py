"""The Python API: ``create_classifier`` and the :class:`Classifier` it returns.

Images -> decode -> views -> image embeddings; classes -> prompts -> text embeddings
(cached); both -> the scorer. Every image is scored on its own (views seeded by the
image's content, a per-image Sinkhorn stop), so results never depend on batch size,
order, or which images ran together.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from awt_engine import scoring
from awt_engine._io import resolve_cache_root
from awt_engine.datasets import get_dataset, read_class_list, validate_template
from awt_engine.descriptions import descriptions_path, load_descriptions
from awt_engine.embedders import (
    ClipEmbedder,
    Embedder,
    LogitModel,
    prompts_needed,
    score_views,
    views_needed,
)
from awt_engine.images import as_rgb_image, decode_images
from awt_engine.prompts import build_prompts
from awt_engine.shortlist import shortlisted_scores
from awt_engine.views import ViewConfig, make_views

DEFAULT_MODEL = "ViT-B-16-quickgelu"  # the AWT paper's main backbone
DEFAULT_PRETRAINED = "openai"
DEFAULT_TEMPLATE = "a photo of a {}"  # CLIP's generic template, for ad-hoc label sets
DEFAULT_DESCRIPTIONS = 50  # AWT: the bare prompt plus 50 descriptions per class


class MissingDescriptionsError(ValueError):
    """A data set was named whose description cache does not exist."""


@dataclass(frozen=True)
class LabelSet:
    """What the classes are and how they are prompted."""

    name: str | None  # data set / description-cache name, if any
    classes: tuple[str, ...]
    template: str
    prompts: list[list[str]]  # [C][P]


def resolve_label_set(
    dataset: str | None = None,
    classes: Sequence[str] | str | None = None,
    template: str | None = None,
    descriptions: int | None = None,
    cache_dir: str | Path | None = None,
) -> LabelSet:
    """Classes, template and prompts from a data set name, an explicit list, or both.

    * classes: ``classes`` if given (a list, a comma list or a file), else the
      description cache's, else the registry's;
    * template: ``template``, else the description cache's, else the registry's,
      else ``"a photo of a {}"``;
    * descriptions: ``descriptions`` per class (default 50 when a data set is named, 0
      otherwise), read from ``<cache>/descriptions/<dataset>.json``.
    """
    root = resolve_cache_root(cache_dir)
    if isinstance(classes, str | Path):
        classes = read_class_list(classes)
    info = None
    cache_file = descriptions_path(dataset, root) if dataset else None
    cached = load_descriptions(cache_file) if cache_file and cache_file.exists() else None
    if dataset and cached is None:
        try:
            info = get_dataset(dataset)
        except ValueError as exc:
            raise ValueError(
                f"{exc}\n(no description cache {cache_file} either; a custom label set "
                "needs --classes, or `awt-engine describe --classes ... --name NAME` first)"
            ) from None
    if descriptions is None:
        descriptions = DEFAULT_DESCRIPTIONS if dataset else 0
    if descriptions < 0:
        raise ValueError(f"descriptions must be >= 0, got {descriptions}")

    if classes is None:
        if cached is not None:
            classes = cached.classes
        elif info is not None and info.classes is not None:
            classes = info.classes
        elif info is not None:
            raise ValueError(
                f"the class names of {info.name!r} are not known offline: pass --classes "
                "(a file with one name per line, or a comma list)"
            )
        else:
            raise ValueError("no classes: pass a data set name (--dataset) or --classes")
    classes = tuple(classes)
    if template is None:
        template = (cached.template if cached is not None else None) or (
            info.template if info is not None else DEFAULT_TEMPLATE
        )
    validate_template(template)

    desc_map = None
    if descriptions > 0:
        if not dataset:
            raise ValueError(
                f"--descriptions {descriptions} needs a description cache: name it with "
                "--dataset, or use --descriptions 0"
            )
        if cached is None:
            raise MissingDescriptionsError(
                f"no class descriptions for data set {dataset!r}: looked for {cache_file}.\n"
                f"Either generate them:   awt-engine describe --dataset {dataset}\n"
                "or classify without:    --descriptions 0"
            )
        desc_map = cached.descriptions
    prompts = build_prompts(classes, template, desc_map, descriptions)
    return LabelSet(dataset, classes, template, prompts)


@dataclass(frozen=True)
class Prediction:
    """One input's outcome: predictions best first, or the reason it failed."""

    path: str
    predictions: list[dict[str, Any]] | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Classifier:
    """Zero-shot classifier over a fixed label set; see :func:`create_classifier`."""

    def __init__(
        self,
        model: Embedder | LogitModel,
        labels: LabelSet,
        *,
        method: str = "awt",
        view_config: ViewConfig = ViewConfig(),
        batch_size: int = 4,
        workers: int = 2,
        awt_config: scoring.AWTConfig | None = None,
        memory_budget: int | None = None,
        shortlist: int | None = None,
    ):
        scoring.check_method(method)
        if shortlist is not None and shortlist < 1:
            raise ValueError(f"shortlist must be >= 1 classes, got {shortlist}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.labels = labels
        self.method = method
        self.view_config = replace(view_config, n_views=views_needed(method, view_config.n_views))
        self.batch_size = batch_size
        self.workers = workers
        self.awt_config = awt_config or scoring.AWTConfig()
        self.memory_budget = memory_budget
        self.shortlist = shortlist
        self._class_embeds: Tensor | None = None

    @property
    def classes(self) -> tuple[str, ...]:
        return self.labels.classes

    @property
    def class_embeds(self) -> Tensor:
        """[C, P, D], encoded once (and cached on disk by the embedder)."""
        if self._class_embeds is None:
            prompts = prompts_needed(self.method, self.labels.prompts)
            self._class_embeds = self.model.embed_prompts(prompts).to(self.model.device)
        return self._class_embeds

    # -- images to embeddings ---------------------------------------------------------

    def make_views(self, image) -> Tensor:
        """[V, 3, R, R] normalised views of one image (PIL, path or array)."""
        rgb = as_rgb_image(image, target_size=self.model.preprocess.size)  # huge ones reduced
        return make_views(rgb, self.model.preprocess, self.view_config, device=self.model.device)

    def _view_batches(self, images: Sequence[Any]) -> Iterator[Tensor]:
        """[b, V, 3, R, R] views, ``batch_size`` images at a time."""
        for i in range(0, len(images), self.batch_size):
            yield torch.stack([self.make_views(im) for im in images[i : i + self.batch_size]])

    def embed_images(self, images: Sequence[Any]) -> Tensor:
        """[B, V, D] view embeddings, ``batch_size`` images per forward pass."""
        return torch.cat([self.embed_views(v) for v in self._view_batches(_as_list(images))])

    def embed_views(self, views: Tensor) -> Tensor:
        """[b, V, 3, R, R] -> [b, V, D], without autograd."""
        with torch.inference_mode():
            return self.model.embed_views(views)

    def scores_from_embeddings(self, image_embeds: Tensor, method: str | None = None) -> Tensor:
        """[B, V, D] -> [B, C] by ``method`` (default: this classifier's).

        With a shortlist, classes outside an image's shortlist score ``-inf``.
        """
        method = method or self.method

        def score(img: Tensor, txt: Tensor) -> Tensor:
            return score_views(
                self.model,
                method,
                image_embeds=img,
                class_embeds=txt,
                awt_config=self.awt_config,
                memory_budget=self.memory_budget,
            )

        txt = self.class_embeds if method != "clip" else self.class_embeds[:, :1]
        if self.shortlist is not None and self.shortlist < txt.shape[0]:
            return shortlisted_scores(score, image_embeds, txt, self.shortlist)
        return score(image_embeds, txt)

    def _scores_for_views(self, views: Tensor) -> Tensor:
        if isinstance(self.model, LogitModel) and not isinstance(self.model, Embedder):
            with torch.inference_mode():
                logits = self.model.view_prompt_logits(
                    views, prompts_needed(self.method, self.labels.prompts)
                )
            return score_views(
                self.model,
                self.method,
                logits=logits,
                awt_config=self.awt_config,
                memory_budget=self.memory_budget,
            )
        return self.scores_from_embeddings(self.embed_views(views))

    # -- public calls --------------------------------------------------------------------

    def scores(self, images: Sequence[Any] | Any) -> Tensor:
        """Class scores [B, C] (logit scale) for images: paths, PIL images or arrays."""
        batches = self._view_batches(_as_list(images))
        return torch.cat([self._scores_for_views(v).float().cpu() for v in batches])

    def _top(self, scores: Tensor, top_k: int) -> list[list[dict[str, Any]]]:
        probs = torch.softmax(scores.float(), dim=-1)  # scores are on CLIP's logit scale
        k = max(1, min(top_k, probs.shape[-1]))
        vals, idx = probs.topk(k, dim=-1)
        return [
            [{"label": self.classes[j], "score": float(v)} for v, j in zip(vr, ir, strict=True)]
            for vr, ir in zip(vals.tolist(), idx.tolist(), strict=True)
        ]

    def predict(self, images: Sequence[Any] | Any, top_k: int = 5):
        """Per image, ``[{"label": ..., "score": ...}, ...]`` best first (scores are
        probabilities over the label set). A single image gives a single list, as the
        Hugging Face zero-shot image classification pipeline does."""
        single = not isinstance(images, list | tuple)
        preds = self._top(self.scores(images), top_k)
        return preds[0] if single else preds

    def classify(
        self,
        inputs: Iterable[Any],
        *,
        top_k: int = 5,
        progress: bool = False,
        total: int | None = None,
    ) -> Iterator[Prediction]:
        """Stream :class:`Prediction` s for many inputs, decoding in parallel workers.

        An unreadable image yields a Prediction with ``error`` set; the run goes on.
        """
        bar = progress_bar(total, progress)
        pending: list[str] = []  # paths only: a batch's decoded images are not kept
        views: list[Tensor] = []

        def flush():
            if pending:
                scores = self._scores_for_views(torch.stack(views)).float().cpu()
                yield from (
                    Prediction(path, p)
                    for path, p in zip(pending, self._top(scores, top_k), strict=True)
                )
                bar.update(len(pending))
                pending.clear()
                views.clear()

        decoded = decode_images(
            inputs, workers=self.workers, target_size=self.model.preprocess.size
        )
        for item in decoded:
            if not item.ok:
                bar.update(1)
                yield Prediction(item.path, None, item.error)
                continue
            try:
                v = self.make_views(item.image)
            except Exception as exc:  # a decodable image the view code cannot use
                bar.update(1)
                yield Prediction(item.path, None, f"cannot make views: {exc}")
                continue
            pending.append(item.path)
            views.append(v)
            del item  # the pixels go with it
            if len(pending) == self.batch_size:
                yield from flush()
        yield from flush()
        bar.close()


def _as_list(images) -> list:
    return list(images) if isinstance(images, list | tuple) else [images]


def progress_bar(total: int | None, enabled: bool):
    """A tqdm bar over images on stderr; when enabled, drawn only on a terminal."""
    from tqdm.auto import tqdm

    # disable=None: silent when stderr is a pipe or a log file
    return tqdm(
        total=total,
        unit="img",
        file=sys.stderr,
        dynamic_ncols=True,
        disable=None if enabled else True,
    )


def create_classifier(
    model: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    *,
    dataset: str | None = None,
    classes: Sequence[str] | str | None = None,
    template: str | None = None,
    descriptions: int | None = None,
    views: int = 51,
    seed: int = 0,
    method: str = "awt",
    device: str = "auto",
    cache_dir: str | Path | None = None,
    batch_size: int = 4,
    workers: int = 2,
    precision: str | None = None,
    memory_budget: int | None = None,
    shortlist: int | None = None,
    embedder: Embedder | LogitModel | None = None,
) -> Classifier:
    """A ready classifier. Keyword names mirror ``awt-engine classify``'s options.

    model / pretrained: an open_clip model and weights (a pretrained tag, a checkpoint
    file, ``hf-hub:`` or ``local-dir:`` ids; ``pretrained=None`` means random weights).
    dataset: a registry name (``awt-engine datasets``) or a description-cache name.
    classes / template: an explicit label set (list, comma list or file) and prompt.
    descriptions: descriptions per class (default 50 with a data set, else 0).
    views: the image plus ``views - 1`` random crops. method: one of
    :func:`awt_engine.scoring.list_methods`. embedder: use this model instead of
    loading ``model`` (any :class:`Embedder` or :class:`LogitModel`). shortlist: score
    only each image's K nearest classes (large label sets; changes results).
    memory_budget: bytes the scorer's blocks may use (results do not depend on it).
    """
    scoring.check_method(method)
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    root = resolve_cache_root(cache_dir)
    labels = resolve_label_set(dataset, classes, template, descriptions, root)
    if embedder is None:
        from awt_engine.backbone import load_backbone

        if pretrained == DEFAULT_PRETRAINED and model.startswith(("local-dir:", "hf-hub:")):
            pretrained = None  # those ids carry their own weights

        embedder = ClipEmbedder(
            load_backbone(model, pretrained, device=device, precision=precision), cache_root=root
        )
    return Classifier(
        embedder,
        labels,
        method=method,
        view_config=ViewConfig(n_views=views, seed=seed),
        batch_size=batch_size,
        workers=workers,
        memory_budget=memory_budget,
        shortlist=shortlist,
    )


__all__ = [
    "Classifier",
    "LabelSet",
    "MissingDescriptionsError",
    "Prediction",
    "create_classifier",
    "resolve_label_set",
]
