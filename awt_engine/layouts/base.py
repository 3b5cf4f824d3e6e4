"""The layout protocol: the result types, one read request, and the ordered list of layouts.

A layout knows one way a data set can lie on disk (Dassl's ``DatasetBase`` subclasses are
the model). It has a ``name``, a one-line ``description``, ``detect(request) -> bool``
(are these files mine?) and ``load(request) -> LabelledData``. :func:`register_layout`
adds a layout class to :data:`LAYOUTS`; :func:`awt_engine.labelled.load_labelled` asks the
layouts in list order and the first that detects the request reads it, so the order
decides ties. A layout marked ``fallback`` (the class-folder reader, which claims every
request) stays behind every other: a layout registered later is still asked before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

__all__ = [
    "LAYOUTS",
    "DatasetFiles",
    "DatasetLayoutError",
    "LabelledData",
    "LabelledItem",
    "Layout",
    "LayoutRequest",
    "find_layout",
    "register_layout",
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


@dataclass(frozen=True)
class DatasetFiles:
    """Where a registry data set's files live (see :mod:`awt_engine.layouts.catalog`).

    Every field defaults to "nothing known", which is what a folder given without a
    registry data set gets.
    """

    folders: tuple[str, ...] = ()  # the data set's folder name(s) under a parent root
    split_file: str | None = None  # CoOp split file in the data set folder
    split_image_dir: str = ""  # split-file impaths are relative to this (in the folder)
    list_glob: str | None = None  # FGVC-style list files (images_variant_<split>.txt)
    image_dirs: tuple[str, ...] = ()  # class-folder roots inside the data set folder
    synonyms: tuple[tuple[str, str], ...] = ()  # (folder / split name, registry name)
    ignored: tuple[str, ...] = ()  # class folders that are not classes
    numeric_zero_based: bool = False  # numeric class folders are 0-based labels


@dataclass(frozen=True)
class LayoutRequest:
    """One call of ``load_labelled``, checked, with what the registry knows of the data set."""

    root: Path  # the data root as given (an existing folder)
    split: str  # stripped, non-empty
    dataset: str | None  # the name as given, None for a plain folder of class folders
    registered: bool  # ``dataset`` is a registry name (``name`` is then its registry name)
    name: str  # registry name, the name as given, or the root folder's name
    files: DatasetFiles  # where its files live; empty when unknown
    target: tuple[str, ...] | None  # class names in label order (given, or the registry's)
    given: bool  # ``target`` is the caller's class list
    label: str  # how error messages name the class names: "given" or "'<data set>'"
    bases: tuple[Path, ...]  # the root, then the data set's known folders under it
    cache_dir: str | Path | None = None  # description cache root for unknown names
    unknown: str = ""  # the registry's error for a name it does not know


class Layout:
    """One way a data set lies on disk; subclass, set ``name``/``description``, register."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    fallback: ClassVar[bool] = False  # claims every request: asked after all others

    def detect(self, request: LayoutRequest) -> bool:
        raise NotImplementedError

    def load(self, request: LayoutRequest) -> LabelledData:
        raise NotImplementedError


LAYOUTS: list[Layout] = []  # asked in this order; fallbacks last


def register_layout(cls: type[Layout]) -> type[Layout]:
    """Class decorator: add an instance of ``cls`` to :data:`LAYOUTS`.

    Appended after the layouts registered before it, but ahead of the fallbacks (unless it
    is one). A name registered twice replaces the first in its place.
    """
    if not cls.name:
        raise ValueError(f"layout {cls.__qualname__} needs a name")
    layout = cls()
    for i, old in enumerate(LAYOUTS):
        if old.name == cls.name:
            LAYOUTS[i] = layout
            return cls
    if cls.fallback:
        LAYOUTS.append(layout)
    else:
        first_fallback = next((i for i, lay in enumerate(LAYOUTS) if lay.fallback), len(LAYOUTS))
        LAYOUTS.insert(first_fallback, layout)
    return cls


def find_layout(request: LayoutRequest) -> Layout:
    """The first layout of :data:`LAYOUTS` that detects ``request``."""
    for layout in LAYOUTS:
        if layout.detect(request):
            return layout
    raise DatasetLayoutError(f"no data set layout reads {str(request.root)!r}")
