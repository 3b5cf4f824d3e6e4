"""Own images with own descriptions: a data set name the registry does not know, but a
description cache has (``cache import``, ``describe --name``)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from awt_engine._io import resolve_cache_root
from awt_engine.descriptions import descriptions_path, load_descriptions
from awt_engine.layouts.base import (
    DatasetFiles,
    DatasetLayoutError,
    LabelledData,
    LabelledItem,
    Layout,
    LayoutRequest,
    register_layout,
)
from awt_engine.layouts.class_folders import load_class_folders
from awt_engine.layouts.folders import resolve_class_root
from awt_engine.layouts.matching import MAX_LISTED, Matcher, listing

__all__ = ["DescribedFolders", "load_described"]


@register_layout
class DescribedFolders(Layout):
    """A data set name the registry does not know: class folders named after the classes
    of that name's description cache (an error naming both when there is no cache)."""

    name = "described-folders"
    description = "own class folders, classes from a description cache of the same name"

    def detect(self, request: LayoutRequest) -> bool:
        return request.dataset is not None and not request.registered

    def load(self, request: LayoutRequest) -> LabelledData:
        target = request.target if request.given else None
        return load_described(
            request.root,
            request.name,
            target,
            request.split,
            request.cache_dir,
            unknown=request.unknown,
        )


def load_described(
    root: Path,
    name: str,
    target: tuple[str, ...] | None,
    split: str,
    cache_dir: str | os.PathLike | None,
    *,
    unknown: str,
) -> LabelledData:
    """``name`` is no registry data set but may name a description cache (``cache import``,
    ``describe --name``): the data root is then a folder of class folders (ImageFolder,
    split folders entered as usual) whose names are matched to the cache's classes.

    The label set is the classes that have a folder, spelled and ordered as in the cache
    (the names the descriptions were written for). A folder that matches no cached class
    is a :class:`DatasetLayoutError` listing every such folder; cached classes without a
    folder are left out with a warning naming them. With ``target`` (a given class list)
    the folders are matched onto that list instead. ``unknown`` is the registry's error,
    raised (with the cache file looked for) when there is no such cache either.
    """
    try:
        path = descriptions_path(name, resolve_cache_root(cache_dir))
    except ValueError:  # not usable as a cache file name
        path = None
    if path is None or not path.is_file():
        looked = f"No description cache {path} either" if path else "Not a cache name either"
        raise ValueError(
            f"{unknown} {looked}: for your own classes, import their descriptions with "
            f"`awt-engine cache import FILE --dataset NAME` or write them with "
            f"`awt-engine describe --classes FILE --name NAME` first."
        )
    described = load_descriptions(path).classes
    folder, notes = resolve_class_root(root, split)
    data = load_class_folders(folder, notes, name=name, target=target, files=DatasetFiles())
    if target is not None:
        return data
    return onto_described(data, described, folder, path)


def onto_described(
    data: LabelledData, described: Sequence[str], folder: Path, path: Path
) -> LabelledData:
    """``data``'s folder classes renamed to the cache's classes they match (folded names)."""
    matcher = Matcher(described)
    index = {i: matcher.find(c) for i, c in enumerate(data.classes)}
    unmatched = [data.classes[i] for i, j in index.items() if j is None]
    if unmatched:
        parts = []
        for c in unmatched[:MAX_LISTED]:
            close = matcher.closest(c)
            parts.append(f"{c!r}" + (f" (closest: {', '.join(map(repr, close))})" if close else ""))
        more = f" and {len(unmatched) - MAX_LISTED} more" if len(unmatched) > MAX_LISTED else ""
        raise DatasetLayoutError(
            f"{len(unmatched)} of {len(data.classes)} class folders in {str(folder)!r} have no "
            f"class in description cache {path} (names are matched ignoring case, spaces, "
            f"'_' and '-'): {'; '.join(parts)}{more}; rename the folders, or add the classes "
            "to the description file and import it again with --force"
        )
    by_class: dict[int, list[str]] = {}
    for i, j in index.items():
        by_class.setdefault(j, []).append(data.classes[i])
    clashes = [
        f"{' and '.join(map(repr, g))} -> {described[j]!r}"
        for j, g in by_class.items()
        if len(g) > 1
    ]
    if clashes:
        raise DatasetLayoutError(
            f"class folders in {str(folder)!r} match the same class of {path} more than "
            f"once: {'; '.join(clashes)}"
        )
    order = sorted(by_class)  # the cache's label order
    notes = [f"classes and descriptions from {path}"]
    unused = [c for j, c in enumerate(described) if j not in by_class]
    if unused:
        text = (
            f"{len(unused)} of the {len(described)} classes of description cache {path} have "
            f"no class folder with images in {str(folder)!r} and are left out: {listing(unused)}"
        )
        warnings.warn(text, stacklevel=5)
        notes.append(text)
    relabel = {i: order.index(j) for i, j in index.items()}
    items = tuple(LabelledItem(item.path, relabel[item.label]) for item in data.items)
    return LabelledData(
        name=data.name,
        classes=tuple(described[j] for j in order),
        items=items,
        source=data.source + "".join(f"; {n}" for n in notes),
        empty_folders=data.empty_folders,
    )
