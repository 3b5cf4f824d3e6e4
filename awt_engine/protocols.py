"""Evaluation protocols over :func:`~awt_engine.evaluate.evaluate`: one loaded model
scored on class subsets of a labelled set, and CoOp's base-to-new report.

CoOp's base-to-new protocol splits the classes in label order (the first half, rounded
up, are "base", the rest "new"; :func:`~awt_engine.training.data.subsample_classes`),
evaluates each half as its own label set, and reports per scorer the top-1 accuracy of
each and their harmonic mean ``2 b n / (b + n)``.

A trained checkpoint keeps its own label set (classes, template, descriptions). When a
subset's classes are exactly the checkpoint's, that label set is used as it is
(:func:`uses_own_labels`); otherwise the classes are named afresh.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from awt_engine.classifier import Classifier, create_classifier
from awt_engine.dispatch import ModelSource, RayOptions, evaluate_with
from awt_engine.evaluate import EvalResult, harmonic_means
from awt_engine.labelled import LabelledData
from awt_engine.models.base import trained_info
from awt_engine.models.factory import DEFAULT_MODEL
from awt_engine.training.data import subsample_classes

SUBSAMPLES = ("all", "base", "new", "base-new")  # base-new: both halves and their harmonic mean


def uses_own_labels(net, classes: Sequence[str]) -> bool:
    """Whether ``net`` is a trained checkpoint whose own label set has exactly ``classes``."""
    info = trained_info(net)
    return info is not None and tuple(info.header["labels"]["classes"]) == tuple(classes)


def label_options(net, data: LabelledData, dataset: str | None) -> dict[str, Any]:
    """create_classifier's ``dataset`` and ``classes`` for scoring ``data`` with ``net``:
    the checkpoint's own label set (with its descriptions) when the classes are its own,
    else ``data``'s classes (with ``dataset``'s template and descriptions)."""
    if uses_own_labels(net, data.classes):
        return {"dataset": None, "classes": None}
    return {"dataset": dataset, "classes": list(data.classes)}


def model_name(net, model: str | None = None) -> str:
    """The model name a result record carries: ``model``, else the checkpoint's backbone,
    else the default model."""
    info = trained_info(net)
    return model or (info.header["backbone"]["model"] if info is not None else DEFAULT_MODEL)


@dataclass(frozen=True)
class SplitRun:
    """One evaluated class subset: its data, the classifier that scored it, the result."""

    part: str  # all, base or new
    data: LabelledData
    classifier: Classifier
    result: EvalResult


@dataclass(frozen=True)
class HarmonicMean:
    """One scorer's base-to-new report; accuracies are fractions in [0, 1]."""

    base: float  # top-1 on the base classes (0.0 when no image was scored)
    new: float  # top-1 on the new classes (0.0 when no image was scored)
    harmonic_mean: float | None  # 2 b n / (b + n); None when either is missing or both are 0


@dataclass(frozen=True)
class BaseToNewResult:
    base: SplitRun
    new: SplitRun
    harmonic: dict[str, HarmonicMean] = field(default_factory=dict)  # scorer -> report


def evaluate_split(
    net,
    data: LabelledData,
    scorers: Sequence[str],
    *,
    part: str = "all",
    dataset: str | None = None,
    options: Mapping[str, Any] | None = None,
    source: ModelSource | None = None,
    ray: RayOptions | None = None,
    cache_root: Path | None = None,
    image_cache: bool = True,
    progress: bool = False,
    eval_options: Mapping[str, Any] | None = None,
) -> SplitRun:
    """``data`` (already subset to ``part``'s classes) scored by ``net`` with each scorer.

    ``options`` are create_classifier's keywords other than the model and the labels
    (template, descriptions, views, frames, seed, cache_dir, batches, budgets,
    awt_config); ``scorer`` defaults to the first of ``scorers``. With ``ray`` the actors
    load the model from ``source``. ``eval_options``: evaluate's ``orders``,
    ``order_seed`` and ``ood`` (:func:`~awt_engine.evaluate.evaluate`)."""
    settings = {"scorer": scorers[0], **(options or {}), **label_options(net, data, dataset)}
    clf = create_classifier(embedder=net, **settings, progress=progress)
    result = evaluate_with(
        clf,
        data,
        scorers,
        source=source,
        options=settings,
        ray=ray,
        cache_root=cache_root,
        image_cache=image_cache,
        progress=progress,
        eval_options=eval_options,
    )
    return SplitRun(part, data, clf, result)


def evaluate_subsamples(
    net,
    data: LabelledData,
    parts: Sequence[str],
    scorers: Sequence[str],
    *,
    before: Callable[[str, LabelledData], None] | None = None,
    after: Callable[[SplitRun], None] | None = None,
    **kwargs,
) -> dict[str, SplitRun]:
    """:func:`evaluate_split` for each of ``parts`` (all, base, new) of ``data``'s classes,
    in order; ``before(part, subset)`` and ``after(run)`` let a caller report each."""
    runs = {}
    for part in parts:
        subset = subsample_classes(data, part)
        if before is not None:
            before(part, subset)
        runs[part] = evaluate_split(net, subset, scorers, part=part, **kwargs)
        if after is not None:
            after(runs[part])
    return runs


def base_to_new_report(base: EvalResult, new: EvalResult) -> dict[str, HarmonicMean]:
    """Per scorer: base top-1, new top-1 and their harmonic mean."""
    return {name: HarmonicMean(*row) for name, row in harmonic_means(base, new).items()}


def evaluate_base_to_new(
    net,
    data: LabelledData,
    scorers: Sequence[str],
    **kwargs,
) -> BaseToNewResult:
    """CoOp's base-to-new protocol: ``data``'s classes split in base and new halves, each
    evaluated as its own label set (:func:`evaluate_split`'s keywords, plus ``before`` /
    ``after`` as for :func:`evaluate_subsamples`), and per scorer the harmonic mean of
    the two top-1 accuracies.

    ``net`` is a loaded model (:func:`~awt_engine.classifier.load_model`); a checkpoint
    trained on the base classes scores them with its own label set."""
    runs = evaluate_subsamples(net, data, ("base", "new"), scorers, **kwargs)
    base, new = runs["base"], runs["new"]
    return BaseToNewResult(base, new, base_to_new_report(base.result, new.result))


__all__ = [
    "SUBSAMPLES",
    "BaseToNewResult",
    "HarmonicMean",
    "SplitRun",
    "base_to_new_report",
    "evaluate_base_to_new",
    "evaluate_split",
    "evaluate_subsamples",
    "label_options",
    "model_name",
    "uses_own_labels",
]
