"""Labelled data sets: which image has which label, and the few-shot subsets of them.

:func:`load_labelled` returns the image paths of a data set with their label indices and
the class names in label order; it never opens an image. It reads CoOp split files,
FGVC-Aircraft's lists, folders of class folders (ImageFolder, with split subfolders) and
ImageNet's layouts; :mod:`awt_engine._layouts` documents each and holds the readers.
:func:`subset` takes a fixed-seed random subset.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from awt_engine.registry import get_dataset, validate_class_names

__all__ = [
    "DatasetLayoutError",
    "LabelledData",
    "LabelledItem",
    "load_labelled",
    "subset",
]


class DatasetLayoutError(ValueError):
    """A data set folder is not laid out as expected (the message says where and what)."""


@dataclass(frozen=True)
class LabelledItem:
    path: Path
    label: int  # index into LabelledData.classes


@dataclass(frozen=True)
class LabelledData:
    name: str  # data set name, or the folder's name
    classes: tuple[str, ...]  # label order
    items: tuple[LabelledItem, ...]  # deterministic order
    source: str  # human-readable: layout, file or folder, notes
    # class folders skipped for having no images (train refuses them: a class it cannot learn)
    empty_folders: tuple[str, ...] = ()


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
    classes (see ``_layouts._load_described``: a folder the cache lacks is an error, a
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

    from awt_engine._layouts import (
        _LAYOUTS,
        _candidate_bases,
        _find_class_root,
        _Layout,
        _layout_hint,
        _load_class_folders,
        _load_coop_split,
        _load_described,
        _load_fgvc,
        _resolve_class_root,
    )

    if dataset is None:
        folder, notes = _resolve_class_root(root, split)
        return _load_class_folders(
            folder, notes, name=_root_name(root), target=target, layout=_Layout()
        )

    try:
        info = get_dataset(dataset)
    except ValueError as exc:  # not a registry name: perhaps a description cache's
        return _load_described(root, dataset, target, split, cache_dir, unknown=str(exc))
    layout = _LAYOUTS.get(info.name, _Layout())
    if target is None and info.classes is not None:
        target = info.classes
    label = "given" if classes is not None else f"{info.name!r}"
    bases = _candidate_bases(root, layout)

    if layout.split_file is not None:
        for base in bases:
            path = base / layout.split_file
            if path.is_file():
                return _load_coop_split(path, base, root, layout, info.name, target, label, split)
    if info.name == "fgvc_aircraft":
        for base in bases:
            if any(base.glob("images_variant_*.txt")):
                return _load_fgvc(base, root, info.name, target, label, split)

    try:
        folder, notes = _find_class_root(root, bases, layout, split)
        return _load_class_folders(
            folder, notes, name=info.name, target=target, layout=layout, target_label=label
        )
    except DatasetLayoutError as exc:
        hint = _layout_hint(info.name, layout, root)
        raise DatasetLayoutError(f"{exc}{hint}") from None


def _root_name(root: Path) -> str:
    """The data set's name when none is given: the data root's own, or its parent's when
    the root is a split folder (``~/data/pets/val`` is "pets", not "val")."""
    from awt_engine._layouts import _SPLIT_DIR_NAMES

    resolved = root.resolve()
    if resolved.name.lower() in _SPLIT_DIR_NAMES and resolved.parent.name:
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
