"""The layout readers behind :func:`awt_engine.labelled.load_labelled`.

Each reader finds a data set's image paths and label indices and its class names in label
order; none opens an image. Layouts, tried in this order:

1. **CoOp split files** (registry data sets that have one). CoOp's benchmark folders keep
   ``split_zhou_<Name>.json`` = ``{"train" | "val" | "test": [[impath, label, classname],
   ...]}`` in the data set's folder, with ``impath`` relative to its image folder:

   ============== ================ ===================================== =====================
   data set       folder           split file                            image folder
   ============== ================ ===================================== =====================
   dtd            dtd              split_zhou_DescribableTextures.json   images
   eurosat        eurosat          split_zhou_EuroSAT.json               2750
   oxford_pets    oxford_pets      split_zhou_OxfordPets.json            images
   oxford_flowers oxford_flowers   split_zhou_OxfordFlowers.json         jpg
   food101        food-101         split_zhou_Food101.json               images
   caltech101     caltech-101      split_zhou_Caltech101.json            101_ObjectCategories
   stanford_cars  stanford_cars    split_zhou_StanfordCars.json          (the folder itself)
   sun397         sun397           split_zhou_SUN397.json                SUN397
   ucf101         ucf101           split_zhou_UCF101.json                UCF-101-midframes
   ============== ================ ===================================== =====================

   An ``impath`` not under the image folder is looked for under the data set folder, the
   given root and (once, for the first such path) folders up to three levels below.

2. **FGVC-Aircraft lists**: ``images_variant_<split>.txt`` (lines ``<image id> <variant
   name>``), images ``images/<id>.jpg``, class order ``variants.txt`` when the registry
   has none; in ``fgvc_aircraft/`` (CoOp), ``fgvc-aircraft-2013b/data/`` or ``data/``.

3. **Folders of class folders** (ImageFolder): every immediate subfolder holding images is
   a class, its images (and videos) found recursively by extension
   (:data:`IMAGE_EXTENSIONS`, :data:`~awt_engine.video.VIDEO_EXTENSIONS`). The
   folder used is, in order: a data set's known image folder (``imagenet/images``,
   ``imagenetv2/imagenetv2-matched-frequency-format-val``, ``imagenet-sketch/images`` or
   ``sketch``, ``imagenet-adversarial/imagenet-a``, ``imagenet-rendition/imagenet-r``,
   ``dtd/images``, ``eurosat/2750``, ``food-101/images``,
   ``caltech-101/101_ObjectCategories``, ``ucf101/UCF-101-midframes``, then UCF101's
   videos ``UCF-101/`` (the download: one folder of ``.avi`` clips per class),
   ``CUB_200_2011/images``, ``256_ObjectCategories``), the data set's folder, or the root.
   A folder whose only image-holding subfolder is ``images/`` is entered; a folder whose
   image-holding subfolders are all split names (train/val/test...) is entered at
   ``split`` (``"test"`` falls back to ``val/`` when there is no ``test/``: ImageNet
   evaluates on its validation set).
   A class folder (or a folder inside one) that cannot be listed (permission denied) is a
   :class:`DatasetLayoutError` naming it, not skipped: without its images the
   evaluation would silently measure a different data set.

Labels of class folders:

* **WordNet ids** (``n01440764``...; ImageNet, -Sketch, -A, -R): when there is one
  folder per class, the label is the folder's position in sorted order, which is the
  standard label order (ImageNet-1k's, and the ascending-ImageNet-index order the registry
  uses for the 200 ImageNet-A/R classes). With only some of the 1000 ImageNet wnid
  folders present, a CoOp ``classnames.txt`` (``<wnid> <name>`` per line, all 1000 wnids)
  next to the images supplies the order; partial ImageNet-A/R copies are refused.
* **Numbers** (ImageNetV2's ``0``..``999``): the number is the label (0-based when a
  ``0`` folder exists or for ImageNetV2; 1-based when the highest label's number is
  present instead, as in some Flowers-102 copies).
* **Names**: matched to the class names leniently (case, ``_``/``-``/spaces, then all
  punctuation ignored; a ``001.`` numeric prefix as in CUB and Caltech-256 dropped), plus
  the renamings CoOp applies (EuroSAT ``AnnualCrop`` -> "annual crop land" ...,
  Caltech-101 ``Faces`` -> "face" ...). Names that match nothing are an error listing
  them with the closest class names. Split-file class names are matched the same way, and
  the names win over the file's integer labels when the two disagree.

With no data set, the class names are the folder names (sorted; numerically when all are
numbers), or the explicit ``classes`` the folders are matched to.

A data set name the registry does not know but a description cache has (``cache import``,
``describe --name``) reads the root as folders of class folders, matched to the cache's
classes by name (case, ``_``/``-``/spaces, then punctuation ignored); see
:func:`_load_described`.

Not read: raw ImageNet validation files without wnid folders, Oxford Pets / Flowers /
Stanford Cars / SUN397 without their CoOp split files (their images are not in class
folders), the official Food-101 / CUB / UCF101 list files (their folders are read
instead, all images of every split).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from awt_engine.inputs import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from awt_engine.labelled import DatasetLayoutError, LabelledData, LabelledItem
from awt_engine.registry import loose_key, match_key, validate_class_names

# --------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class _Layout:
    """Where a registry data set's files live (see the module docstring)."""

    folders: tuple[str, ...] = ()  # the data set's folder name(s) under a parent root
    split_file: str | None = None  # CoOp split file in the data set folder
    split_image_dir: str = ""  # split-file impaths are relative to this (in the folder)
    image_dirs: tuple[str, ...] = ()  # class-folder roots inside the data set folder
    synonyms: tuple[tuple[str, str], ...] = ()  # (folder / split name, registry name)
    ignored: tuple[str, ...] = ()  # class folders that are not classes
    numeric_zero_based: bool = False  # numeric class folders are 0-based labels


_EUROSAT_SYNONYMS = (
    # Folder names of the EuroSAT download (2750/<name>/) ...
    ("AnnualCrop", "annual crop land"),
    ("Forest", "forest"),
    ("HerbaceousVegetation", "brushland or shrubland"),
    ("Highway", "highway or road"),
    ("Industrial", "industrial buildings or commercial buildings"),
    ("Pasture", "pasture land"),
    ("PermanentCrop", "permanent crop land"),
    ("Residential", "residential buildings or homes or apartments"),
    ("River", "river"),
    ("SeaLake", "lake or sea"),
    # ... and CoOp's names for them (in split_zhou_EuroSAT.json).
    ("Annual Crop Land", "annual crop land"),
    ("Herbaceous Vegetation Land", "brushland or shrubland"),
    ("Highway or Road", "highway or road"),
    ("Industrial Buildings", "industrial buildings or commercial buildings"),
    ("Pasture Land", "pasture land"),
    ("Permanent Crop Land", "permanent crop land"),
    ("Residential Buildings", "residential buildings or homes or apartments"),
    ("Sea or Lake", "lake or sea"),
)

_LAYOUTS: dict[str, _Layout] = {
    "dtd": _Layout(
        folders=("dtd",),
        split_file="split_zhou_DescribableTextures.json",
        split_image_dir="images",
        image_dirs=("images",),
    ),
    "eurosat": _Layout(
        folders=("eurosat", "EuroSAT"),
        split_file="split_zhou_EuroSAT.json",
        split_image_dir="2750",
        image_dirs=("2750",),
        synonyms=_EUROSAT_SYNONYMS,
    ),
    "oxford_pets": _Layout(
        folders=("oxford_pets",),
        split_file="split_zhou_OxfordPets.json",
        split_image_dir="images",
    ),
    "oxford_flowers": _Layout(
        folders=("oxford_flowers",),
        split_file="split_zhou_OxfordFlowers.json",
        split_image_dir="jpg",
    ),
    "fgvc_aircraft": _Layout(
        folders=("fgvc_aircraft", "fgvc-aircraft-2013b/data", "fgvc-aircraft-2013b", "data"),
    ),
    "food101": _Layout(
        folders=("food-101", "food101"),
        split_file="split_zhou_Food101.json",
        split_image_dir="images",
        image_dirs=("images",),
    ),
    "caltech101": _Layout(
        folders=("caltech-101", "caltech101"),
        split_file="split_zhou_Caltech101.json",
        split_image_dir="101_ObjectCategories",
        image_dirs=("101_ObjectCategories",),
        synonyms=(
            ("airplanes", "airplane"),
            ("Faces", "face"),
            ("Leopards", "leopard"),
            ("Motorbikes", "motorbike"),
        ),
        ignored=("BACKGROUND_Google", "Faces_easy"),
    ),
    "stanford_cars": _Layout(
        folders=("stanford_cars",),
        split_file="split_zhou_StanfordCars.json",
        split_image_dir="",
    ),
    "sun397": _Layout(
        folders=("sun397",),
        split_file="split_zhou_SUN397.json",
        split_image_dir="SUN397",
    ),
    "ucf101": _Layout(
        folders=("ucf101", "UCF-101"),
        split_file="split_zhou_UCF101.json",
        split_image_dir="UCF-101-midframes",
        # CoOp's middle frames first; else the download's videos (UCF-101/<Class>/*.avi,
        # CamelCase folder names, which match the class names with "_" ignored)
        image_dirs=("UCF-101-midframes", "UCF-101"),
    ),
    "imagenet": _Layout(folders=("imagenet",), image_dirs=("images",)),
    "imagenetv2": _Layout(
        folders=("imagenetv2", "imagenet-v2"),
        image_dirs=(
            "imagenetv2-matched-frequency-format-val",
            "imagenetv2-threshold0.7-format-val",
            "imagenetv2-top-images-format-val",
        ),
        numeric_zero_based=True,
    ),
    "imagenet_sketch": _Layout(
        folders=("imagenet-sketch", "imagenet_sketch"), image_dirs=("images", "sketch")
    ),
    "imagenet_a": _Layout(
        folders=("imagenet-adversarial", "imagenet_a"), image_dirs=("imagenet-a",)
    ),
    "imagenet_r": _Layout(folders=("imagenet-rendition", "imagenet_r"), image_dirs=("imagenet-r",)),
    "cub": _Layout(folders=("CUB_200_2011", "cub"), image_dirs=("images",)),
    "caltech256": _Layout(
        folders=("caltech256", "caltech-256"), image_dirs=("256_ObjectCategories",)
    ),
}

_SPLIT_DIR_NAMES = frozenset(
    {"train", "training", "trainval", "val", "valid", "validation", "test", "testing"}
)
_SPLIT_DIR_CHOICES = {
    "test": ("test", "testing", "val", "validation", "valid"),
    "val": ("val", "validation", "valid"),
    "train": ("train", "training"),
}
_WNID = re.compile(r"n\d{8}")
_NUMERIC_PREFIX = re.compile(r"\d+\.(.+)")
_MAX_LISTED = 10


# --------------------------------------------------------------------------- finding folders


def _candidate_bases(root: Path, layout: _Layout) -> list[Path]:
    """The root itself, then the data set's known folder names under it."""
    bases = [root]
    for name in layout.folders:
        path = root / name
        if path.is_dir():
            bases.append(path)
    return bases


def _find_class_root(
    root: Path, bases: Sequence[Path], layout: _Layout, split: str
) -> tuple[Path, list[str]]:
    for base in bases:
        for sub in layout.image_dirs:
            if (base / sub).is_dir():
                return _resolve_class_root(base / sub, split)
    if len(bases) > 1:  # the data set's own folder under a parent root
        return _resolve_class_root(bases[1], split)
    return _resolve_class_root(root, split)


def _resolve_class_root(folder: Path, split: str) -> tuple[Path, list[str]]:
    """Enter ``images/`` and split folders (see the module docstring); also returns notes."""
    notes: list[str] = []
    used_split = False
    for _ in range(4):
        holding = [d for d in _subfolders(folder) if _has_image(d)]
        names = {d.name: d for d in holding}
        if len(holding) == 1 and holding[0].name.lower() == "images":
            folder = holding[0]
            continue
        if holding and not used_split and all(n.lower() in _SPLIT_DIR_NAMES for n in names):
            by_lower = {n.lower(): d for n, d in names.items()}
            choices = _SPLIT_DIR_CHOICES.get(split.lower(), (split.lower(),))
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


def _subfolders(folder: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise DatasetLayoutError(f"cannot list folder {str(folder)!r}: {exc}") from None
    return [Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir()]


_INPUT_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS  # class folders may hold videos


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in _INPUT_EXTENSIONS


def _walk_images(folder: Path, *, strict: bool = False) -> Iterable[Path]:
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
            if _is_image_name(name):
                yield Path(current, name)


def _has_image(folder: Path) -> bool:
    return next(iter(_walk_images(folder)), None) is not None


def _layout_hint(name: str, layout: _Layout, root: Path) -> str:
    where = f"{str(root)!r}" + (
        f" or its subfolder {' or '.join(layout.folders)}" if layout.folders else ""
    )
    if layout.split_file:
        return f" (for {name}, expected the CoOp split file {layout.split_file} in {where}, or one folder per class)"
    if name == "fgvc_aircraft":
        return f" (for {name}, expected images_variant_<split>.txt and images/ in {where})"
    if layout.image_dirs:
        return f" (for {name}, expected {' or '.join(layout.image_dirs)}/ with one folder per class in {where})"
    return ""


# --------------------------------------------------------------------------- class folders


def _load_class_folders(
    folder: Path,
    notes: list[str],
    *,
    name: str,
    target: tuple[str, ...] | None,
    layout: _Layout,
    target_label: str = "given",
) -> LabelledData:
    class_dirs: list[tuple[Path, list[Path]]] = []
    empty: list[str] = []
    for sub in _subfolders(folder):
        images = sorted(_walk_images(sub, strict=True))
        if images:
            class_dirs.append((sub, images))
        else:
            empty.append(sub.name)
    if not class_dirs:
        loose = any(_is_image_name(p.name) for p in _safe_iterdir(folder))
        what = (
            "images directly in it but no class subfolders"
            if loose
            else f"no images or videos ({'/'.join(sorted(_INPUT_EXTENSIONS))}) in any subfolder"
        )
        raise DatasetLayoutError(
            f"{str(folder)!r} has {what}; expected one folder of images per class"
        )
    if empty:
        notes.append(f"skipped {len(empty)} folder(s) without images: {_listing(empty)}")

    ignored = set(layout.ignored)
    skipped = [d.name for d, _ in class_dirs if d.name in ignored]
    if skipped and target is not None:
        class_dirs = [(d, imgs) for d, imgs in class_dirs if d.name not in ignored]
        notes.append(f"skipped non-class folder(s) {', '.join(skipped)}")

    names = [d.name for d, _ in class_dirs]
    where = f"{str(folder)!r}"
    if target is None:
        # Folder names become the class names: two that give the same prompt ('sea_lion'
        # and 'Sea Lion') would be two classes no scorer can tell apart.
        validate_class_names(names, source=f"class folders of {where}")
        classes = tuple(sorted(names, key=_natural_key) if _all_numeric(names) else names)
        mapping = {n: classes.index(n) for n in names}
        kind = "ImageFolder"
    elif all(_WNID.fullmatch(n) for n in names):
        mapping, kind = _wnid_labels(names, target, folder)
        classes = target
    elif _all_numeric(names):
        mapping, kind = _numeric_labels(names, target, folder, layout.numeric_zero_based)
        classes = target
    else:
        mapping = _match_names(
            names,
            target,
            synonyms=layout.synonyms,
            what="class folder",
            where=where,
            label=target_label,
        )
        classes = target
        kind = "ImageFolder"

    items = [
        LabelledItem(path=path, label=mapping[d.name])
        for d, images in class_dirs
        for path in images
    ]
    items.sort(key=lambda item: str(item.path))
    _note_missing_classes(notes, classes, {item.label for item in items})
    source = f"{kind} {folder}" + "".join(f"; {n}" for n in notes)
    return LabelledData(
        name=name,
        classes=tuple(classes),
        items=tuple(items),
        source=source,
        empty_folders=tuple(e for e in empty if e not in ignored),
    )


def _safe_iterdir(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


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
                    f"{str(folder)!r}: WordNet-id folder(s) {_listing(unknown)} are not among "
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
        if (
            len(wnids) == 1000
            and len(set(wnids)) == 1000
            and all(_WNID.fullmatch(w) for w in wnids)
        ):
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
            f"{str(folder)!r}: numbered class folder(s) {_listing(bad)} are outside "
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


def _note_missing_classes(notes: list[str], classes: Sequence[str], present: set[int]) -> None:
    missing = [c for i, c in enumerate(classes) if i not in present]
    if missing:
        notes.append(
            f"{len(missing)} of {len(classes)} classes have no images: {_listing(missing)}"
        )


def _listing(names: Sequence[str], limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --------------------------------------------------------------------------- name matching


_FOLDS = (str.strip, match_key, loose_key)  # ever more lenient (awt_engine.registry)


@dataclass
class _Matcher:
    """Finds a name's class index: exact first, then ever more lenient foldings."""

    classes: Sequence[str]
    synonyms: Sequence[tuple[str, str]] = ()
    _tables: list[dict[str, set[int]]] = field(default_factory=list)
    _synonyms: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for fold in _FOLDS:
            table: dict[str, set[int]] = {}
            for i, c in enumerate(self.classes):
                table.setdefault(fold(c), set()).add(i)
            self._tables.append(table)
        self._synonyms = {loose_key(a): b for a, b in self.synonyms}

    def _direct(self, name: str) -> int | None:
        for fold, table in zip(_FOLDS, self._tables, strict=True):
            hits = table.get(fold(name))
            if hits is not None and len(hits) == 1:
                return next(iter(hits))
        return None

    def find(self, name: str) -> int | None:
        candidates = [name]
        prefixed = _NUMERIC_PREFIX.fullmatch(name)
        if prefixed:
            candidates.append(prefixed.group(1))
        for candidate in candidates:
            index = self._direct(candidate)
            if index is not None:
                return index
            alias = self._synonyms.get(loose_key(candidate))
            if alias is not None:
                index = self._direct(alias)
                if index is not None:
                    return index
        return None

    def closest(self, name: str, n: int = 2) -> list[str]:
        folded = {}
        for c in self.classes:
            folded.setdefault(match_key(c), c)
        key = match_key(_NUMERIC_PREFIX.sub(r"\1", name))
        return [folded[k] for k in difflib.get_close_matches(key, list(folded), n=n, cutoff=0.5)]


def _match_names(
    names: Sequence[str],
    target: Sequence[str],
    *,
    synonyms: Sequence[tuple[str, str]],
    what: str,
    where: str,
    label: str,
) -> dict[str, int]:
    """Map every name onto an index of ``target``; DatasetLayoutError if any does not match."""
    matcher = _Matcher(target, synonyms)
    mapping: dict[str, int] = {}
    unmatched: list[str] = []
    for name in names:
        index = matcher.find(name)
        if index is None:
            unmatched.append(name)
        else:
            mapping[name] = index
    if unmatched:
        parts = []
        for name in unmatched[:_MAX_LISTED]:
            close = matcher.closest(name)
            hint = f" (closest: {', '.join(repr(c) for c in close)})" if close else ""
            parts.append(f"{name!r}{hint}")
        more = f" and {len(unmatched) - _MAX_LISTED} more" if len(unmatched) > _MAX_LISTED else ""
        if label == "given":
            fix = "check the class list against these names"
        elif what == "class folder":
            fix = "rename the folders, or give a class list that names them"
        else:
            fix = "give a class list that names them"
        raise DatasetLayoutError(
            f"{len(unmatched)} of {len(names)} {what} names in {where} match none of the "
            f"{len(target)} {label} class names: {'; '.join(parts)}{more}; {fix}"
        )
    by_index: dict[int, list[str]] = {}
    for name, index in mapping.items():
        by_index.setdefault(index, []).append(name)
    clashes = [(i, group) for i, group in by_index.items() if len(group) > 1]
    if clashes:
        parts = [f"{' and '.join(repr(g) for g in group)} -> {target[i]!r}" for i, group in clashes]
        raise DatasetLayoutError(
            f"{what} names in {where} match the same class more than once: " + "; ".join(parts)
        )
    return mapping


# --------------------------------------------------------------------------- CoOp split files


def _load_coop_split(
    path: Path,
    base: Path,
    root: Path,
    layout: _Layout,
    name: str,
    target: tuple[str, ...] | None,
    label: str,
    split: str,
) -> LabelledData:
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

    notes: list[str] = []
    file_labels: dict[str, int] = {}
    for _, lab, cname in rows:
        file_labels.setdefault(cname, lab)
    names = list(file_labels)
    if target is None:
        by_label: dict[int, str] = {}
        for cname, lab in file_labels.items():
            if by_label.setdefault(lab, cname) != cname:
                raise DatasetLayoutError(
                    f"split file {str(path)!r}: label {lab} is both {by_label[lab]!r} and {cname!r}"
                )
        labels = sorted(by_label)
        classes = tuple(by_label[lab] for lab in labels)
        mapping = {cname: labels.index(lab) for cname, lab in file_labels.items()}
    else:
        classes = target
        mapping = _match_names(
            names,
            target,
            synonyms=layout.synonyms,
            what="class",
            where=f"{path.name} ({split})",
            label=label,
        )
        differ = [c for c in names if mapping[c] != file_labels[c]]
        if differ:
            notes.append(
                f"the file's integer labels differ from the class order for {len(differ)} "
                "class(es); labels follow the class names"
            )

    image_dir = base / layout.split_image_dir if layout.split_image_dir else base
    paths = _resolve_listed([r[0] for r in rows], image_dir, [base, root], path, split)
    items = tuple(
        LabelledItem(path=p, label=mapping[cname])
        for p, (_, _, cname) in zip(paths, rows, strict=True)
    )
    _note_missing_classes(notes, classes, {item.label for item in items})
    source = f"CoOp split file {path.name} ({split}) in {base}" + "".join(f"; {n}" for n in notes)
    return LabelledData(name=name, classes=tuple(classes), items=items, source=source)


def _resolve_listed(
    relpaths: Sequence[str], image_dir: Path, fallbacks: Sequence[Path], listed_in: Path, split: str
) -> list[Path]:
    """Find each listed image under ``image_dir``, the fallbacks, or a discovered folder."""
    prefixes = list(dict.fromkeys([image_dir, *fallbacks]))
    out: list[Path] = []
    missing: list[str] = []
    searched = False
    for rel in relpaths:
        found = _first_existing(rel, prefixes)
        if found is None and not searched:
            searched = True
            extra = _search_prefix(rel, fallbacks)
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
            f"({split}) were not found under {str(image_dir)!r}: {_listing(missing, 5)}"
        )
    return out


def _first_existing(rel: str, prefixes: Sequence[Path]) -> Path | None:
    relpath = Path(rel)
    if relpath.is_absolute():
        return relpath if relpath.is_file() else None
    for prefix in prefixes:
        candidate = prefix / relpath
        if candidate.is_file():
            return candidate
    return None


def _search_prefix(
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
            for sub in _subfolders_quiet(folder):
                seen += 1
                if seen > budget:
                    return None
                if (sub / rel).is_file():
                    return sub
                nxt.append(sub)
        frontier = nxt
    return None


def _subfolders_quiet(folder: Path) -> list[Path]:
    try:
        return _subfolders(folder)
    except DatasetLayoutError:
        return []


# --------------------------------------------------------------------------- FGVC-Aircraft


def _load_fgvc(
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
    for lineno, line in enumerate(_read_lines(list_file), start=1):
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
            target = tuple(dict.fromkeys(_read_lines(variants_file)))
            label = "variants.txt"
        else:
            target = tuple(sorted(names))
            label = "listed"
    mapping = _match_names(
        names, target, synonyms=(), what="variant", where=list_file.name, label=label
    )
    paths = _resolve_listed(
        [f"{image_id}.jpg" for image_id, _ in rows], base / "images", [base, root], list_file, split
    )
    items = tuple(
        LabelledItem(path=p, label=mapping[v]) for p, (_, v) in zip(paths, rows, strict=True)
    )
    _note_missing_classes(notes, target, {item.label for item in items})
    source = f"FGVC-Aircraft list {list_file.name} in {base}" + "".join(f"; {n}" for n in notes)
    return LabelledData(name=name, classes=tuple(target), items=items, source=source)


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetLayoutError(f"cannot read {str(path)!r}: {exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------- own descriptions


def _load_described(
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
    from awt_engine._io import resolve_cache_root
    from awt_engine.descriptions import descriptions_path, load_descriptions

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
    folder, notes = _resolve_class_root(root, split)
    data = _load_class_folders(folder, notes, name=name, target=target, layout=_Layout())
    if target is not None:
        return data
    return _onto_described(data, described, folder, path)


def _onto_described(
    data: LabelledData, described: Sequence[str], folder: Path, path: Path
) -> LabelledData:
    """``data``'s folder classes renamed to the cache's classes they match (folded names)."""
    matcher = _Matcher(described)
    index = {i: matcher.find(c) for i, c in enumerate(data.classes)}
    unmatched = [data.classes[i] for i, j in index.items() if j is None]
    if unmatched:
        parts = []
        for c in unmatched[:_MAX_LISTED]:
            close = matcher.closest(c)
            parts.append(f"{c!r}" + (f" (closest: {', '.join(map(repr, close))})" if close else ""))
        more = f" and {len(unmatched) - _MAX_LISTED} more" if len(unmatched) > _MAX_LISTED else ""
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
            f"no class folder with images in {str(folder)!r} and are left out: {_listing(unused)}"
        )
        warnings.warn(text, stacklevel=4)
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
