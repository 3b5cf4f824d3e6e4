"""CoOp split files: ``split_zhou_<Name>.json`` in a registry data set's folder.

The file is ``{"train" | "val" | "test": [[impath, label, classname], ...]}`` with
``impath`` relative to the data set's image folder (:attr:`DatasetFiles.split_image_dir`);
see :mod:`awt_engine.layouts` for the table of data sets and where a path not under the
image folder is looked for.
"""

from __future__ import annotations

import json
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
from awt_engine.layouts.folders import resolve_listed
from awt_engine.layouts.matching import match_names, note_missing_classes

__all__ = ["CoopSplitFile", "load_coop_split"]


@register_layout
class CoopSplitFile(Layout):
    """A registry data set with a CoOp split file, found in the root or its own folder."""

    name = "coop-split-file"
    description = "CoOp's split_zhou_<Name>.json: [image path, label, class name] per split"

    def detect(self, request: LayoutRequest) -> bool:
        return self._find(request) is not None

    def load(self, request: LayoutRequest) -> LabelledData:
        found = self._find(request)
        assert found is not None  # detect said so
        path, base = found
        return load_coop_split(
            path,
            base,
            request.root,
            request.files,
            request.name,
            request.target,
            request.label,
            request.split,
        )

    @staticmethod
    def _find(request: LayoutRequest) -> tuple[Path, Path] | None:
        """(split file, the data set folder holding it), first base first."""
        if request.files.split_file is None:
            return None
        for base in request.bases:
            path = base / request.files.split_file
            if path.is_file():
                return path, base
        return None


def load_coop_split(
    path: Path,
    base: Path,
    root: Path,
    files: DatasetFiles,
    name: str,
    target: tuple[str, ...] | None,
    label: str,
    split: str,
) -> LabelledData:
    """The ``split`` of split file ``path`` (in data set folder ``base``), labelled by
    ``target`` when given (names matched), else by the file's own labels."""
    rows = _read_rows(path, split)
    notes: list[str] = []
    file_labels: dict[str, int] = {}
    for _, lab, cname in rows:
        file_labels.setdefault(cname, lab)
    if target is None:
        classes, mapping = _own_labels(file_labels, path)
    else:
        classes = target
        mapping = match_names(
            list(file_labels),
            target,
            synonyms=files.synonyms,
            what="class",
            where=f"{path.name} ({split})",
            label=label,
        )
        differ = [c for c in file_labels if mapping[c] != file_labels[c]]
        if differ:
            notes.append(
                f"the file's integer labels differ from the class order for {len(differ)} "
                "class(es); labels follow the class names"
            )

    image_dir = base / files.split_image_dir if files.split_image_dir else base
    paths = resolve_listed([r[0] for r in rows], image_dir, [base, root], path, split)
    items = tuple(
        LabelledItem(path=p, label=mapping[cname])
        for p, (_, _, cname) in zip(paths, rows, strict=True)
    )
    note_missing_classes(notes, classes, {item.label for item in items})
    source = f"CoOp split file {path.name} ({split}) in {base}" + "".join(f"; {n}" for n in notes)
    return LabelledData(name=name, classes=tuple(classes), items=items, source=source)


def _read_rows(path: Path, split: str) -> list[tuple[str, int, str]]:
    """The (image path, label, class name) rows of ``split``, checked."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetLayoutError(f"cannot read split file {str(path)!r}: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise DatasetLayoutError(
            f"split file {str(path)!r} is not a JSON object of splits (train/val/test)"
        )
    if split not in data:
        raise DatasetLayoutError(
            f"split file {str(path)!r} has no split {split!r}; it has "
            f"{', '.join(repr(k) for k in data) or 'none'}"
        )
    entries = data[split]
    if not isinstance(entries, list):
        raise DatasetLayoutError(f"split file {str(path)!r}: split {split!r} is not a list")
    rows: list[tuple[str, int, str]] = []
    for i, entry in enumerate(entries):
        if (
            not isinstance(entry, list | tuple)
            or len(entry) != 3
            or not isinstance(entry[0], str)
            or isinstance(entry[1], bool)
            or not isinstance(entry[1], int)
            or not isinstance(entry[2], str)
        ):
            raise DatasetLayoutError(
                f"split file {str(path)!r}, {split!r} entry {i}: expected "
                f"[image path, integer label, class name], got {entry!r:.200}"
            )
        rows.append((entry[0], entry[1], entry[2]))
    if not rows:
        raise DatasetLayoutError(f"split file {str(path)!r}: split {split!r} is empty")
    return rows


def _own_labels(file_labels: dict[str, int], path: Path) -> tuple[tuple[str, ...], dict[str, int]]:
    """Classes in the order of the file's labels, and class name -> 0-based label."""
    by_label: dict[int, str] = {}
    for cname, lab in file_labels.items():
        if by_label.setdefault(lab, cname) != cname:
            raise DatasetLayoutError(
                f"split file {str(path)!r}: label {lab} is both {by_label[lab]!r} and {cname!r}"
            )
    labels = sorted(by_label)
    classes = tuple(by_label[lab] for lab in labels)
    return classes, {cname: labels.index(lab) for cname, lab in file_labels.items()}
