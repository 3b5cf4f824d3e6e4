"""FGVC-Aircraft's list files: ``images_variant_<split>.txt`` with ``images/<id>.jpg``."""

from __future__ import annotations

from pathlib import Path

from awt_engine.layouts.base import (
    DatasetLayoutError,
    LabelledData,
    LabelledItem,
    Layout,
    LayoutRequest,
    register_layout,
)
from awt_engine.layouts.folders import read_lines, resolve_listed
from awt_engine.layouts.matching import match_names, note_missing_classes

__all__ = ["FgvcLists", "load_fgvc"]


@register_layout
class FgvcLists(Layout):
    """A registry data set with FGVC-style list files (``DatasetFiles.list_glob``) in the
    root or one of its known folders; class order from ``variants.txt`` when the
    registry has none."""

    name = "fgvc-lists"
    description = "FGVC-Aircraft's images_variant_<split>.txt lines '<image id> <variant>'"

    def detect(self, request: LayoutRequest) -> bool:
        return self._base(request) is not None

    def load(self, request: LayoutRequest) -> LabelledData:
        base = self._base(request)
        assert base is not None  # detect said so
        return load_fgvc(
            base, request.root, request.name, request.target, request.label, request.split
        )

    @staticmethod
    def _base(request: LayoutRequest) -> Path | None:
        pattern = request.files.list_glob
        if pattern is None:
            return None
        return next((base for base in request.bases if any(base.glob(pattern))), None)


def load_fgvc(
    base: Path,
    root: Path,
    name: str,
    target: tuple[str, ...] | None,
    label: str,
    split: str,
) -> LabelledData:
    list_file = base / f"images_variant_{split}.txt"
    if not list_file.is_file():
        have = sorted(p.name for p in base.glob("images_variant_*.txt"))
        raise DatasetLayoutError(
            f"{str(base)!r} has no {list_file.name} for split {split!r}; it has {', '.join(have)}"
        )
    rows: list[tuple[str, str]] = []
    for lineno, line in enumerate(read_lines(list_file), start=1):
        parts = line.split(" ", 1)
        if len(parts) != 2 or not parts[1].strip():
            raise DatasetLayoutError(
                f"{str(list_file)!r}, line {lineno}: expected '<image id> <variant>', got {line!r}"
            )
        rows.append((parts[0], parts[1].strip()))
    if not rows:
        raise DatasetLayoutError(f"{str(list_file)!r} lists no images")

    names = list(dict.fromkeys(v for _, v in rows))
    notes: list[str] = []
    if target is None:
        variants_file = base / "variants.txt"
        if variants_file.is_file():
            target = tuple(dict.fromkeys(read_lines(variants_file)))
            label = "variants.txt"
        else:
            target = tuple(sorted(names))
            label = "listed"
    mapping = match_names(
        names, target, synonyms=(), what="variant", where=list_file.name, label=label
    )
    paths = resolve_listed(
        [f"{image_id}.jpg" for image_id, _ in rows], base / "images", [base, root], list_file, split
    )
    items = tuple(
        LabelledItem(path=p, label=mapping[v]) for p, (_, v) in zip(paths, rows, strict=True)
    )
    note_missing_classes(notes, target, {item.label for item in items})
    source = f"FGVC-Aircraft list {list_file.name} in {base}" + "".join(f"; {n}" for n in notes)
    return LabelledData(name=name, classes=tuple(target), items=items, source=source)
