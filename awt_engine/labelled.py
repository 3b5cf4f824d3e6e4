"""Labelled data sets: which image has which label, and the few-shot subsets of them.

:func:`load_labelled` returns the image paths of a data set with their label indices and
the class names in label order; it never opens an image. It reads CoOp split files,
FGVC-Aircraft's lists, folders of class folders (ImageFolder, with split subfolders) and
ImageNet's layouts, and own class folders described by a description cache: the layouts
of :mod:`awt_engine.layouts`, asked in their list's order (that package documents each).
:func:`subset` takes a fixed-seed random subset.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from awt_engine.layouts import (
    DatasetLayoutError,
    LabelledData,
    LabelledItem,
    LayoutRequest,
    find_layout,
)
from awt_engine.layouts.catalog import candidate_bases, files_for
from awt_engine.layouts.folders import SPLIT_DIR_NAMES
from awt_engine.registry import get_dataset, validate_class_names

__all__ = [
    "DatasetLayoutError",
    "LabelledData",
    "LabelledItem",
    "load_labelled",
    "subset",
]


# --------------------------------------------------------------------------- public API


def load_labelled(
    data_root: str | Path,
    *,
    dataset: str | None = None,
    classes: Sequence[str] | None = None,
    split: str = "test",
    cache_dir: str | Path | None = None,
) -> LabelledData:
    """The labelled images of ``split`` under ``data_root`` (see the module docstring).

    ``dataset`` (a registry name) selects the known layouts and gives the class names;
    ``data_root`` may be the data set's folder or its parent. Without it, ``data_root``
    is a folder of class folders named after their classes. ``classes`` (label order)
    replaces the registry's or the folders' names; folders and split-file names are
    matched onto it.

    A ``dataset`` that the registry does not know may name a description cache under
    ``cache_dir`` (the cache root, default ``$AWT_ENGINE_CACHE`` or ``./cache``): then
    ``data_root`` is a folder of class folders, matched by folded name to the cache's
    classes (see :mod:`awt_engine.layouts.described`: a folder the cache lacks is an error, a
    cached class without a folder is left out with a warning).

    Raises :class:`DatasetLayoutError` (a ValueError) naming the folder or file and what
    was expected; ValueError for an unknown data set name or a bad class list.
    """
    root = Path(data_root).expanduser()
    if not root.exists():
        raise DatasetLayoutError(f"data root {str(root)!r} does not exist")
    if not root.is_dir():
        raise DatasetLayoutError(f"data root {str(root)!r} is not a folder")
    if not isinstance(split, str) or not split.strip():
        raise ValueError(f"split must be a non-empty name such as 'test', got {split!r}")
    split = split.strip()
    target = None
    if classes is not None:
        if isinstance(classes, str):
            raise TypeError("classes must be a sequence of class names, not one string")
        target = tuple(validate_class_names(classes, source="class list"))

    request = _request(root, dataset, target, split, cache_dir)
    return find_layout(request).load(request)


def _request(
    root: Path,
    dataset: str | None,
    target: tuple[str, ...] | None,
    split: str,
    cache_dir: str | Path | None,
) -> LayoutRequest:
    """What the layouts need to know of one call: the registry's entry, if any, and where
    the data set's files are expected."""
    given = target is not None
    info, unknown = None, ""
    if dataset is not None:
        try:
            info = get_dataset(dataset)
        except ValueError as exc:  # not a registry name: perhaps a description cache's
            unknown = str(exc)
    files = files_for(info.name if info is not None else None)
    if target is None and info is not None and info.classes is not None:
        target = info.classes
    name = info.name if info is not None else dataset if dataset is not None else _root_name(root)
    return LayoutRequest(
        root=root,
        split=split,
        dataset=dataset,
        registered=info is not None,
        name=name,
        files=files,
        target=target,
        given=given,
        label="given" if given else f"{name!r}",
        bases=candidate_bases(root, files),
        cache_dir=cache_dir,
        unknown=unknown,
    )


def _root_name(root: Path) -> str:
    """The data set's name when none is given: the data root's own, or its parent's when
    the root is a split folder (``~/data/pets/val`` is "pets", not "val")."""
    resolved = root.resolve()
    if resolved.name.lower() in SPLIT_DIR_NAMES and resolved.parent.name:
        return resolved.parent.name
    return resolved.name or str(root)


def subset(data: LabelledData, limit: int | None, seed: int = 0) -> LabelledData:
    """A fixed-seed random subset of ``limit`` items, in their original relative order.

    ``limit`` None, or at least the number of items: ``data`` unchanged. The same seed
    always picks the same items. Raises ValueError when ``limit`` < 1.
    """
    if limit is None:
        return data
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise ValueError(f"limit must be a whole number of images, got {limit!r}")
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    total = len(data.items)
    if limit >= total:
        return data
    chosen = sorted(random.Random(seed).sample(range(total), limit))
    return replace(
        data,
        items=tuple(data.items[i] for i in chosen),
        source=f"{data.source}; random subset of {limit} of {total} images (seed {seed})",
    )
