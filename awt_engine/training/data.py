"""Few-shot training data, as the few-shot papers' CoOp / Dassl code draws it.

* :func:`few_shot`: K images per class, drawn with the seed from each class's images in
  their listed order (Dassl's ``generate_fewshot_dataset``: a class with fewer keeps all).
  The draw depends only on (data, K, seed), never on the global RNG.
* :func:`check_classes`: what training needs of its data, checked before any model
  loads: two classes or more, each with images (an error naming those without and the
  others' counts), and a warning naming the classes that have fewer images than the shots
  asked for, with their counts.
* :func:`subsample_classes`: CoOp's base-to-new protocol: the sorted labels are split in
  half, ``base`` the first ceil(C/2), ``new`` the rest, each relabelled from 0.
* :func:`fingerprint`: a SHA-256 over the class names and every (label, file content),
  recorded in checkpoints so a checkpoint says exactly what it learned from.

Decoding and views come from the one input pipeline (:mod:`awt_engine.inputs`:
``view_batches`` with a ``DecodedCache`` kept across epochs).
"""

from __future__ import annotations

import math
import random
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

from awt_engine._io import file_sha256, sha256_hex
from awt_engine.labelled import LabelledData, LabelledItem

SUBSAMPLES = ("all", "base", "new")


def few_shot(data: LabelledData, shots: int, seed: int) -> LabelledData:
    """``shots`` images per class (all of a class that has fewer), drawn with ``seed``."""
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be a whole number >= 1, got {shots!r}")
    by_label: dict[int, list[LabelledItem]] = {}
    for item in data.items:
        by_label.setdefault(item.label, []).append(item)
    rng = random.Random(f"awt-engine/few-shot/{seed}")
    chosen: list[LabelledItem] = []
    for label in sorted(by_label):
        items = by_label[label]
        chosen += rng.sample(items, shots) if len(items) >= shots else items
    missing = [data.classes[c] for c in range(len(data.classes)) if c not in by_label]
    note = f"; {shots}-shot (seed {seed}): {len(chosen)} images"
    if missing:
        note += f"; no images for {len(missing)} class(es): {', '.join(missing[:5])}"
    return replace(data, items=tuple(chosen), source=data.source + note)


def check_classes(data: LabelledData, shots: int, classes_from: str = "classes") -> None:
    """ValueError when ``data`` cannot be trained on: class folders without images, classes
    (``classes_from`` says whose: a ``--classes`` list, a data set's) without any, or
    fewer than two classes. A warning names the classes with fewer than ``shots`` images
    (they train on all they have, as Dassl does), with their counts."""
    counts = Counter(it.label for it in data.items)
    problems = []
    if data.empty_folders:
        problems.append(f"class folder(s) without images: {_listing(data.empty_folders)}")
    missing = [c for i, c in enumerate(data.classes) if not counts[i]]
    if missing:
        problems.append(f"{classes_from} without training images: {_listing(missing)}")
    have = [f"{c} ({counts[i]})" for i, c in enumerate(data.classes) if counts[i]]
    if problems:
        others = f" (images per class: {_listing(have)})" if have else ""
        raise ValueError(
            f"{data.name}: {'; '.join(problems)}{others}. Every class needs training "
            "images: add some, or leave the class out"
        )
    if len(data.classes) < 2:
        only = [f"{c} with {counts[i]} images" for i, c in enumerate(data.classes)]
        raise ValueError(
            f"{data.name}: training needs two classes or more, the data has "
            f"{len(data.classes)}: {_listing(only) or 'none'}"
        )
    short = [f"{c} ({counts[i]})" for i, c in enumerate(data.classes) if counts[i] < shots]
    if short:
        warnings.warn(
            f"--shots {shots}: {len(short)} of {len(data.classes)} classes have fewer training "
            f"images and train on all they have: {_listing(short)}",
            stacklevel=2,
        )


def _listing(names: Sequence[str], limit: int = 10) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def subsample_classes(data: LabelledData, which: str) -> LabelledData:
    """CoOp's base-to-new split of the classes: ``all`` (unchanged), ``base`` or ``new``."""
    if which not in SUBSAMPLES:
        raise ValueError(f"subsample must be one of {', '.join(SUBSAMPLES)}, got {which!r}")
    if which == "all":
        return data
    n = len(data.classes)
    m = math.ceil(n / 2)
    keep = list(range(m)) if which == "base" else list(range(m, n))
    if not keep:
        raise ValueError(f"{data.name}: {n} class(es) leave no {which} classes")
    relabel = {old: new for new, old in enumerate(keep)}
    items = tuple(
        LabelledItem(it.path, relabel[it.label]) for it in data.items if it.label in relabel
    )
    return replace(
        data,
        classes=tuple(data.classes[c] for c in keep),
        items=items,
        source=f"{data.source}; {which} classes ({len(keep)} of {n})",
    )


def fingerprint(data: LabelledData) -> str:
    """SHA-256 over the class names and each item's (label, file SHA-256), order-free."""
    rows = sorted(f"{it.label}:{file_sha256(it.path)}" for it in data.items)
    return sha256_hex("awt-engine/training-data/v1", *data.classes, "|", *rows)
