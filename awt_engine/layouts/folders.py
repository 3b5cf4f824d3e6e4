"""Finding things in a data set folder: class-folder roots, split folders, image files,
listed files; none is opened. Shared by the layout modules."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from awt_engine.inputs import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from awt_engine.layouts.base import DatasetFiles, DatasetLayoutError
from awt_engine.layouts.matching import listing

SPLIT_DIR_NAMES = frozenset(
    {"train", "training", "trainval", "val", "valid", "validation", "test", "testing"}
)
SPLIT_DIR_CHOICES = {
    "test": ("test", "testing", "val", "validation", "valid"),
    "val": ("val", "validation", "valid"),
    "train": ("train", "training"),
}


def find_class_root(
    root: Path, bases: Sequence[Path], files: DatasetFiles, split: str
) -> tuple[Path, list[str]]:
    for base in bases:
        for sub in files.image_dirs:
            if (base / sub).is_dir():
                return resolve_class_root(base / sub, split)
    if len(bases) > 1:  # the data set's own folder under a parent root
        return resolve_class_root(bases[1], split)
    return resolve_class_root(root, split)


def resolve_class_root(folder: Path, split: str) -> tuple[Path, list[str]]:
    """Enter ``images/`` and split folders (see the module docstring); also returns notes."""
    notes: list[str] = []
    used_split = False
    for _ in range(4):
        holding = [d for d in subfolders(folder) if has_image(d)]
        names = {d.name: d for d in holding}
        if len(holding) == 1 and holding[0].name.lower() == "images":
            folder = holding[0]
            continue
        if holding and not used_split and all(n.lower() in SPLIT_DIR_NAMES for n in names):
            by_lower = {n.lower(): d for n, d in names.items()}
            choices = SPLIT_DIR_CHOICES.get(split.lower(), (split.lower(),))
            pick = next((by_lower[c] for c in choices if c in by_lower), None)
            if pick is None:
                raise DatasetLayoutError(
                    f"{str(folder)!r} holds split folders ({', '.join(sorted(names))}) but "
                    f"none for split {split!r}; expected one of {', '.join(choices)}"
                )
            if pick.name.lower() != split.lower():
                notes.append(f"split {split!r} read from {pick.name}/")
            folder = pick
            used_split = True
            continue
        break
    if not used_split and split != "test":
        notes.append(f"no {split}/ folder: split {split!r} ignored, all images used")
    return folder, notes


def subfolders(folder: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise DatasetLayoutError(f"cannot list folder {str(folder)!r}: {exc}") from None
    return [Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir()]


INPUT_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS  # class folders may hold videos


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in INPUT_EXTENSIONS


def walk_images(folder: Path, *, strict: bool = False) -> Iterable[Path]:
    """Image files under ``folder``; ``strict``: a folder that cannot be listed is a
    DatasetLayoutError naming it (else it reads as holding no images)."""

    def unreadable(exc: OSError) -> None:
        where = exc.filename if exc.filename is not None else folder
        reason = "permission denied" if isinstance(exc, PermissionError) else exc.strerror
        raise DatasetLayoutError(
            f"cannot read folder {str(where)!r} ({reason or exc}): its images would be "
            "missing from the evaluation; make it readable (or move it out of the data set)"
        )

    for current, dirs, files in os.walk(folder, onerror=unreadable if strict else None):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if is_image_name(name):
                yield Path(current, name)


def has_image(folder: Path) -> bool:
    return next(iter(walk_images(folder)), None) is not None


def safe_iterdir(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def resolve_listed(
    relpaths: Sequence[str], image_dir: Path, fallbacks: Sequence[Path], listed_in: Path, split: str
) -> list[Path]:
    """Find each listed image under ``image_dir``, the fallbacks, or a discovered folder."""
    prefixes = list(dict.fromkeys([image_dir, *fallbacks]))
    out: list[Path] = []
    missing: list[str] = []
    searched = False
    for rel in relpaths:
        found = first_existing(rel, prefixes)
        if found is None and not searched:
            searched = True
            extra = search_prefix(rel, fallbacks)
            if extra is not None:
                prefixes.append(extra)
                found = extra / rel
        if found is None:
            missing.append(rel)
        else:
            out.append(found)
    if missing:
        raise DatasetLayoutError(
            f"{len(missing)} of {len(relpaths)} images listed in {str(listed_in)!r} "
            f"({split}) were not found under {str(image_dir)!r}: {listing(missing, 5)}"
        )
    return out


def first_existing(rel: str, prefixes: Sequence[Path]) -> Path | None:
    relpath = Path(rel)
    if relpath.is_absolute():
        return relpath if relpath.is_file() else None
    for prefix in prefixes:
        candidate = prefix / relpath
        if candidate.is_file():
            return candidate
    return None


def search_prefix(
    rel: str, tops: Sequence[Path], depth: int = 3, budget: int = 2000
) -> Path | None:
    """A folder up to ``depth`` levels below ``tops`` under which ``rel`` exists."""
    if Path(rel).is_absolute():
        return None
    frontier = list(dict.fromkeys(tops))
    seen = 0
    for _ in range(depth):
        nxt: list[Path] = []
        for folder in frontier:
            for sub in subfolders_quiet(folder):
                seen += 1
                if seen > budget:
                    return None
                if (sub / rel).is_file():
                    return sub
                nxt.append(sub)
        frontier = nxt
    return None


def subfolders_quiet(folder: Path) -> list[Path]:
    try:
        return subfolders(folder)
    except DatasetLayoutError:
        return []


# --------------------------------------------------------------------------- FGVC-Aircraft


def read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetLayoutError(f"cannot read {str(path)!r}: {exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]
