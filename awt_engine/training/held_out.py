"""Held-out accuracy during and after training.

:func:`val_data` reads the few-shot held-out set (min(shots, 4) images per class, as
CoOp keeps its val sets) before any model loads; :func:`val_accuracy` scores a model in
training on it through the one run loop (a :class:`~awt_engine.classifier.Classifier`
with the clip scorer, view 0, and :func:`~awt_engine.evaluate.evaluate`), leaving the
model's train/eval mode and the global RNG as they were, so validating never changes
the run.
"""

from __future__ import annotations

from awt_engine.labelled import LabelledData
from awt_engine.training.data import few_shot, subsample_classes

VAL_SPLIT = "val"  # the split scored when none is named (CoOp's few-shot val sets)
VAL_SHOTS = 4  # CoOp's val sets: min(shots, 4) images per class


def val_data(
    full: LabelledData, subsample, shots, seed, dataset, data_root, classes, cache_dir, split
) -> LabelledData | None:
    """min(shots, 4) images per class of the held-out ``split`` (None: ``val`` when the
    data has one, else None); ValueError when a named split is absent or is the training
    images themselves. The training classes are matched onto the split's folders."""
    from awt_engine.labelled import DatasetLayoutError, load_labelled

    name = split or VAL_SPLIT
    if classes is None and dataset is None:
        classes = list(full.classes)  # a folder layout: the training classes, in their order
    try:
        held_out = load_labelled(
            data_root, dataset=dataset, classes=classes, split=name, cache_dir=cache_dir
        )
    except (DatasetLayoutError, ValueError) as exc:
        if split is None:
            return None
        raise ValueError(f"--val-split {split}: {exc}") from None
    if held_out.source == full.source or not held_out.items:
        if split is None:
            return None  # no separate val split: the loader fell back to the same images
        raise ValueError(
            f"--val-split {split}: no held-out images apart from the training ones "
            f"({held_out.source})"
        )
    return few_shot(subsample_classes(held_out, subsample), min(shots, VAL_SHOTS), seed)


def val_accuracy(net, val: LabelledData, labels) -> float:
    """Top-1 of ``net`` (clip scorer, view 0) on ``val``, in eval mode without gradients;
    the mode and the global RNG are as they were after."""
    import torch

    from awt_engine.classifier import Classifier
    from awt_engine.evaluate import evaluate

    was_training = net.training
    net.eval()
    try:
        clf = Classifier(net, labels, scorer="clip")
        with torch.inference_mode(), torch.random.fork_rng(devices=[]):
            res = evaluate(clf, val, ["clip"], cache_root=None)
    finally:
        net.train(was_training)
    return res.metrics["clip"].acc1
