"""Folders of class folders (ImageFolder): the fallback layout, asked after every other.

Every immediate subfolder holding images (or videos) is a class. Labels come from
WordNet ids, numbers, or names matched to the class names: see
:mod:`awt_engine.layouts` for the rules.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from awt_engine.layouts.base import (
    DatasetFiles,
    DatasetLayoutError,
    LabelledData,
    LabelledItem,
    Layout,
    LayoutRequest,
    register_layout,
)
from awt_engine.layouts.catalog import layout_hint
from awt_engine.layouts.folders import (
    INPUT_EXTENSIONS,
    find_class_root,
    is_image_name,
    resolve_class_root,
    safe_iterdir,
    subfolders,
    walk_images,
)
from awt_engine.layouts.matching import listing, match_names, note_missing_classes
from awt_engine.registry import validate_class_names

WNID = re.compile(r"n\d{8}")


def load_class_folders(
    folder: Path,
    notes: list[str],
    *,
    name: str,
    target: tuple[str, ...] | None,
    files: DatasetFiles,
    target_label: str = "given",
) -> LabelledData:
    """The images of ``folder``'s class folders, labelled (see :mod:`awt_engine.layouts`).

    ``notes`` (appended to) end up in the result's ``source``; ``target`` is the class
    list to match onto (None: the folder names are the classes).
    """
    class_dirs, empty = _class_dirs(folder, notes)
    ignored = set(files.ignored)
    skipped = [d.name for d, _ in class_dirs if d.name in ignored]
    if skipped and target is not None:
        class_dirs = [(d, imgs) for d, imgs in class_dirs if d.name not in ignored]
        notes.append(f"skipped non-class folder(s) {', '.join(skipped)}")

    names = [d.name for d, _ in class_dirs]
    classes, mapping, kind = _labels(names, target, folder, files, target_label)
    items = [
        LabelledItem(path=path, label=mapping[d.name])
        for d, images in class_dirs
        for path in images
    ]
    items.sort(key=lambda item: str(item.path))
    note_missing_classes(notes, classes, {item.label for item in items})
    source = f"{kind} {folder}" + "".join(f"; {n}" for n in notes)
    return LabelledData(
        name=name,
        classes=tuple(classes),
        items=tuple(items),
        source=source,
        empty_folders=tuple(e for e in empty if e not in ignored),
    )


def _class_dirs(folder: Path, notes: list[str]) -> tuple[list[tuple[Path, list[Path]]], list[str]]:
    """(class folder, its sorted images) for each subfolder with images, and the names of
    those without; DatasetLayoutError when no subfolder has any."""
    class_dirs: list[tuple[Path, list[Path]]] = []
    empty: list[str] = []
    for sub in subfolders(folder):
        images = sorted(walk_images(sub, strict=True))
        if images:
            class_dirs.append((sub, images))
        else:
            empty.append(sub.name)
    if not class_dirs:
        loose = any(is_image_name(p.name) for p in safe_iterdir(folder))
        what = (
            "images directly in it but no class subfolders"
            if loose
            else f"no images or videos ({'/'.join(sorted(INPUT_EXTENSIONS))}) in any subfolder"
        )
        raise DatasetLayoutError(
            f"{str(folder)!r} has {what}; expected one folder of images per class"
        )
    if empty:
        notes.append(f"skipped {len(empty)} folder(s) without images: {listing(empty)}")
    return class_dirs, empty


def _labels(
    names: list[str],
    target: tuple[str, ...] | None,
    folder: Path,
    files: DatasetFiles,
    target_label: str,
) -> tuple[tuple[str, ...], dict[str, int], str]:
    """(classes, folder name -> label, kind of folders) for the class folders ``names``."""
    where = f"{str(folder)!r}"
    if target is None:
        # Folder names become the class names: two that give the same prompt ('sea_lion'
        # and 'Sea Lion') would be two classes no scorer can tell apart.
        validate_class_names(names, source=f"class folders of {where}")
        classes = tuple(sorted(names, key=_natural_key) if _all_numeric(names) else names)
        return classes, {n: classes.index(n) for n in names}, "ImageFolder"
    if all(WNID.fullmatch(n) for n in names):
        mapping, kind = _wnid_labels(names, target, folder)
        return target, mapping, kind
    if _all_numeric(names):
        mapping, kind = _numeric_labels(names, target, folder, files.numeric_zero_based)
        return target, mapping, kind
    mapping = match_names(
        names,
        target,
        synonyms=files.synonyms,
        what="class folder",
        where=where,
        label=target_label,
    )
    return target, mapping, "ImageFolder"


def _is_number(name: str) -> bool:
    return name.isascii() and name.isdigit()


def _all_numeric(names: Sequence[str]) -> bool:
    return all(_is_number(n) for n in names)


def _natural_key(name: str) -> tuple[int, str]:
    return (int(name), name) if _is_number(name) else (0, name)


def _wnid_labels(
    names: Sequence[str], target: Sequence[str], folder: Path
) -> tuple[dict[str, int], str]:
    n = len(target)
    ordered = sorted(names)
    if len(ordered) == n:
        return {w: i for i, w in enumerate(ordered)}, "WordNet-id folders (sorted order = label) in"
    if n == 1000:
        order = _read_wnid_list(folder)
        if order is not None:
            unknown = [w for w in names if w not in order]
            if unknown:
                raise DatasetLayoutError(
                    f"{str(folder)!r}: WordNet-id folder(s) {listing(unknown)} are not among "
                    "the 1000 ImageNet classes listed in classnames.txt"
                )
            return {w: order[w] for w in names}, "WordNet-id folders (classnames.txt order) in"
    raise DatasetLayoutError(
        f"{str(folder)!r} has {len(names)} WordNet-id class folders but the class list has "
        f"{n} classes: their labels follow from the sorted order of all {n} folders, so "
        f"every class needs its folder"
        + (
            " (or put CoOp's classnames.txt, '<wnid> <name>' for all 1000 classes, next to "
            "the images)"
            if n == 1000
            else ""
        )
        + "; check that the data set name matches the folder (imagenet, imagenet_a, imagenet_r, ...)"
    )


def _read_wnid_list(folder: Path) -> dict[str, int] | None:
    """wnid -> ImageNet label from a CoOp classnames.txt in ``folder`` or up to 3 parents."""
    for place in (folder, *list(folder.parents)[:3]):
        path = place / "classnames.txt"
        if not path.is_file():
            continue
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        wnids = [line.split(maxsplit=1)[0] for line in lines if line.strip()]
        if len(wnids) == 1000 and len(set(wnids)) == 1000 and all(WNID.fullmatch(w) for w in wnids):
            return {w: i for i, w in enumerate(sorted(wnids))}
    return None


def _numeric_labels(
    names: Sequence[str], target: Sequence[str], folder: Path, zero_based: bool
) -> tuple[dict[str, int], str]:
    n = len(target)
    numbers = {name: int(name) for name in names}
    values = set(numbers.values())
    if zero_based or 0 in values:
        offset = 0
    elif n in values:
        offset = 1
    else:
        raise DatasetLayoutError(
            f"{str(folder)!r} has numbered class folders with neither 0 nor {n}: cannot tell "
            f"whether they are 0-based or 1-based labels of the {n} classes"
        )
    bad = sorted((name for name, v in numbers.items() if not 0 <= v - offset < n), key=int)
    if bad:
        raise DatasetLayoutError(
            f"{str(folder)!r}: numbered class folder(s) {listing(bad)} are outside "
            f"{offset}..{n - 1 + offset} for the {n} classes"
        )
    mapping: dict[str, int] = {}
    owner: dict[int, str] = {}
    for name, v in numbers.items():
        other = owner.setdefault(v - offset, name)
        if other != name:
            raise DatasetLayoutError(
                f"{str(folder)!r}: folders {other!r} and {name!r} are the same label {v}"
            )
        mapping[name] = v - offset
    return mapping, f"numbered folders ({offset}-based label) in"


@register_layout
class ClassFolders(Layout):
    """The fallback: a folder of class folders (the data set's image folder, its own folder
    under the root, or the root), for a registry data set or none."""

    name = "class-folders"
    description = "one folder of images (or videos) per class, split folders entered"
    fallback = True

    def detect(self, request: LayoutRequest) -> bool:
        return True

    def load(self, request: LayoutRequest) -> LabelledData:
        if not request.registered:
            folder, notes = resolve_class_root(request.root, request.split)
            return load_class_folders(
                folder, notes, name=request.name, target=request.target, files=DatasetFiles()
            )
        try:
            folder, notes = find_class_root(
                request.root, request.bases, request.files, request.split
            )
            return load_class_folders(
                folder,
                notes,
                name=request.name,
                target=request.target,
                files=request.files,
                target_label=request.label,
            )
        except DatasetLayoutError as exc:
            hint = layout_hint(request.name, request.files, request.root)
            raise DatasetLayoutError(f"{exc}{hint}") from None
