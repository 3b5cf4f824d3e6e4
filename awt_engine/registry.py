"""The data set registry: CLIP prompt templates, one-line descriptions and class names.

Templates are the ones the AWT paper evaluates with (docs/design.md section 4). Class names
are public facts of each data set, kept in label order in the packaged file
``awt_engine/data/classnames.json``; ImageNet's 1000 names (open_clip's list, copied to
``awt_engine/data/imagenet_classnames.json``) are data here too, and the 200-class ImageNet-A / ImageNet-R entries are index subsets of them.

User-supplied class lists (``--classes``) go through :func:`read_class_list`.
"""

from __future__ import annotations

import difflib
import functools
import importlib.resources
import importlib.util
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DatasetInfo",
    "class_key",
    "display_name",
    "fill_template",
    "get_dataset",
    "imagenet_classnames",
    "list_datasets",
    "loose_key",
    "match_key",
    "read_class_list",
    "register_dataset",
    "unregister_dataset",
    "validate_class_names",
    "validate_template",
]

PLACEHOLDER = "{}"


@dataclass(frozen=True)
class DatasetInfo:
    """One data set: how to prompt for it, what its images are, and its classes.

    ``classes`` is the label order (entry i names label i) where known offline, else
    ``None`` (then class names come from the data set's folders or a ``--classes`` file).
    """

    name: str
    template: str
    description: str
    classes: tuple[str, ...] | None
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate_template(self.template)
        # Accept lists from callers building their own entries; store tuples.
        if self.classes is not None and not isinstance(self.classes, tuple):
            object.__setattr__(self, "classes", tuple(self.classes))
        if not isinstance(self.aliases, tuple):
            object.__setattr__(self, "aliases", tuple(self.aliases))

    @property
    def num_classes(self) -> int | None:
        return None if self.classes is None else len(self.classes)


# --------------------------------------------------------------------------- registry

# (name, template, description, aliases). Templates verbatim from docs/design.md section 4.
_ENTRIES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    (
        "imagenet",
        "a photo of a {}",
        "photographs of everyday objects, animals, plants, food and scenes",
        ("imagenet1k", "imagenet-1k", "in1k", "ilsvrc2012"),
    ),
    (
        "imagenetv2",
        "a photo of a {}",
        "photographs of everyday objects, animals, plants, food and scenes, collected anew for ImageNet's classes",
        ("imagenet-v2",),
    ),
    (
        "imagenet_a",
        "a photo of a {}",
        "hard real-world photographs of objects and animals that standard classifiers get wrong",
        ("imagenet-adversarial",),
    ),
    (
        "imagenet_sketch",
        "a sketch photo of a {}",
        "black-and-white hand-drawn sketches of objects and animals",
        (),
    ),
    (
        "imagenet_r",
        "a rendition photo of a {}",
        "renditions of objects and animals: art, cartoons, paintings, sculptures, toys, tattoos and video games",
        ("imagenet-rendition",),
    ),
    (
        "dtd",
        "a photo of a {}, which is a type of texture, or a type of pattern",
        "close-up photographs of textures and surface patterns",
        ("describable-textures", "textures"),
    ),
    (
        "eurosat",
        "satellite photo of the {}",
        "satellite images of land use and land cover seen from above",
        (),
    ),
    (
        "oxford_pets",
        "a photo of a {} from OxfordPets",
        "photographs of cat and dog breeds",
        ("pets", "oxford-iiit-pet", "oxford-iiit-pets"),
    ),
    (
        "oxford_flowers",
        "a photo of a {}, a type of flower",
        "photographs of flowers, labelled by species",
        ("flowers102", "flowers-102", "oxford-flowers102", "flowers"),
    ),
    (
        "fgvc_aircraft",
        "a photo of a {} from Fine-Grained Visual Classification of Aircraft",
        "photographs of aircraft, labelled by model variant",
        ("aircraft", "fgvc-aircraft"),
    ),
    (
        "stanford_cars",
        "a photo of a {}",
        "photographs of cars, labelled by make, model and year",
        ("cars",),
    ),
    (
        "sun397",
        "a photo of a {}",
        "photographs of indoor and outdoor scenes and places",
        ("sun",),
    ),
    (
        "caltech101",
        "a photo of a {}",
        "photographs of single objects and animals, mostly centred",
        (),
    ),
    (
        "food101",
        "a photo of a {} from Food101",
        "photographs of dishes and food",
        ("food-101", "food"),
    ),
    (
        "ucf101",
        "a photo of a person doing {}",
        "video frames of people doing sports, playing instruments and everyday actions",
        (),
    ),
    (
        "cub",
        "a photo of the {}",
        "photographs of North American bird species",
        ("cub200", "cub-200-2011"),
    ),
    (
        "caltech256",
        "a photo of the {}",
        "photographs of objects, animals and scenes from everyday categories",
        (),
    ),
    (
        "birdsnap",
        "a photo of the {}",
        "photographs of North American bird species",
        (),
    ),
    (
        "cifar10",
        "a photo of the {}",
        "tiny low-resolution photographs of vehicles and animals",
        (),
    ),
    (
        "cifar100",
        "a photo of the {}",
        "tiny low-resolution photographs of objects, animals, plants, people and scenes",
        (),
    ),
)

# Data sets that use ImageNet-1k's label order and names unchanged.
_IMAGENET_FULL = frozenset({"imagenet", "imagenetv2", "imagenet_sketch"})


def _key(name: str) -> str:
    """Lookup key: case-insensitive, spaces, hyphens and underscores ignored."""
    return re.sub(r"[\s_\-]+", "", name.strip().casefold())


def _build_index() -> dict[str, str]:
    index: dict[str, str] = {}
    for name, _template, _desc, aliases in _ENTRIES:
        for alias in (name, *aliases):
            key = _key(alias)
            assert index.get(key, name) == name, f"registry key {alias!r} is ambiguous"
            index[key] = name
    return index


_INDEX = _build_index()
_BY_NAME = {entry[0]: entry for entry in _ENTRIES}
_REGISTERED: dict[str, DatasetInfo] = {}  # data sets added with register_dataset


def list_datasets() -> list[str]:
    """Registry names, sorted (built-in and registered)."""
    return sorted({*_BY_NAME, *_REGISTERED})


def register_dataset(info: DatasetInfo, *, replace: bool = False) -> DatasetInfo:
    """Add a data set (template, description, classes) so every command knows it by name.

    Its name and aliases must not collide with a built-in entry, nor with a registered
    one unless ``replace``. Returns ``info``; :func:`unregister_dataset` removes it.
    """
    if not isinstance(info, DatasetInfo):
        raise TypeError(f"register_dataset takes a DatasetInfo, got {type(info).__name__}")
    for alias in (info.name, *info.aliases):
        taken = _INDEX.get(_key(alias))
        if taken is not None:
            raise ValueError(f"{alias!r} already names the built-in data set {taken!r}")
        other = _registered_key(alias)
        if other is not None and other != info.name and not replace:
            raise ValueError(f"{alias!r} already names the registered data set {other!r}")
    if info.name in _REGISTERED and not replace:
        raise ValueError(f"data set {info.name!r} is already registered (pass replace=True)")
    if info.classes is not None:
        validate_class_names(info.classes, source=f"data set {info.name!r}")
    _REGISTERED[info.name] = info
    return info


def unregister_dataset(name: str) -> None:
    """Remove a data set added with :func:`register_dataset` (no error if absent)."""
    _REGISTERED.pop(name, None)


def _registered_key(name: str) -> str | None:
    key = _key(name)
    for reg in _REGISTERED.values():
        if any(_key(a) == key for a in (reg.name, *reg.aliases)):
            return reg.name
    return None


def get_dataset(name: str) -> DatasetInfo:
    """The registry entry for ``name`` (case-insensitive; aliases such as "pets" accepted).

    Raises ValueError naming the value and listing the valid names when unknown.
    """
    if not isinstance(name, str):
        raise TypeError(f"data set name must be a string, got {type(name).__name__}")
    canonical = _INDEX.get(_key(name))
    if canonical is None:
        registered = _registered_key(name)
        if registered is not None:
            return _REGISTERED[registered]
        raise ValueError(_unknown_message(name))
    return _dataset_info(canonical)


def _unknown_message(name: str) -> str:
    close = difflib.get_close_matches(_key(name), list(_INDEX), n=3, cutoff=0.6)
    suggestions = list(dict.fromkeys(_INDEX[k] for k in close))
    hint = f" Did you mean {' or '.join(repr(s) for s in suggestions)}?" if suggestions else ""

    def aliases(n):
        return _BY_NAME[n][3] if n in _BY_NAME else _REGISTERED[n].aliases

    choices = ", ".join(
        f"{n} (or {', '.join(aliases(n))})" if aliases(n) else n for n in list_datasets()
    )
    return (
        f"unknown data set {name!r}.{hint} Valid names: {choices}. For another data set, "
        "give its class names as a class list instead."
    )


@functools.cache
def _dataset_info(name: str) -> DatasetInfo:
    _, template, description, aliases = _BY_NAME[name]
    return DatasetInfo(
        name=name,
        template=template,
        description=description,
        classes=_classes_for(name),
        aliases=aliases,
    )


def _classes_for(name: str) -> tuple[str, ...] | None:
    if name in _IMAGENET_FULL:
        return imagenet_classnames()
    entry = _classnames_file()["datasets"].get(name)
    if entry is None:
        return None
    if "indices" in entry:
        assert entry["subset_of"] == "imagenet", entry["subset_of"]
        full = imagenet_classnames()
        return tuple(full[i] for i in entry["indices"])
    return tuple(entry["classes"])


@functools.cache
def _classnames_file() -> dict:
    resource = importlib.resources.files("awt_engine") / "data" / "classnames.json"
    data = json.loads(resource.read_text(encoding="utf-8"))
    assert data.get("format") == 1, f"unknown classnames.json format {data.get('format')!r}"
    return data


@functools.cache
def imagenet_classnames() -> tuple[str, ...]:
    """ImageNet-1k's 1000 class names in label order, as open_clip ships them.

    Data the registry owns (``awt_engine/data/imagenet_classnames.json``, a copy of
    ``open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES`` that a test keeps identical), so
    the registry imports nothing above it. (The curated CLIP names; note they contain two
    repeated names, "missile" at labels 657/744 and "sunglasses" at 836/837, exactly as
    CLIP evaluates.)
    """
    resource = importlib.resources.files("awt_engine") / "data" / "imagenet_classnames.json"
    data = json.loads(resource.read_text(encoding="utf-8"))
    assert data.get("format") == 1, (
        f"unknown imagenet_classnames.json format {data.get('format')!r}"
    )
    names = tuple(data["classes"])
    assert len(names) == 1000, f"imagenet_classnames.json holds {len(names)} names, not 1000"
    return names


# --------------------------------------------------------------------------- class lists

_PATH_SUFFIXES = frozenset({".txt", ".csv", ".tsv", ".lst", ".list", ".names", ".json", ".yaml"})


def read_class_list(spec: str | Path) -> list[str]:
    """Class names from a file (one per line) or from a comma-separated list.

    Files: UTF-8 (a BOM is tolerated), blank lines and lines starting with ``#`` ignored,
    names stripped. A string that names an existing file is read as the file; otherwise
    a string containing a comma is a list ("cat, dog, bird"). A comma-free string that
    looks like a path (has a folder part or a text-file suffix) but does not exist is an
    error; any other comma-free string is a one-class list (add a trailing comma to force
    the list reading of a name such as "F/A-18").

    Raises ValueError on a missing file, an empty list, or duplicate names (also names
    that read the same in a prompt, like "apple_pie" and "Apple pie").
    """
    if isinstance(spec, Path):
        return _read_class_file(spec)
    if not isinstance(spec, str):
        raise TypeError(f"class list must be a path or a string, got {type(spec).__name__}")
    text = spec.strip()
    if not text:
        raise ValueError("empty class list: give a file with one class per line or 'a, b, c'")
    path = Path(text).expanduser()
    try:
        is_file, is_dir = path.is_file(), path.is_dir()
    except OSError:  # e.g. a name too long to be a path
        is_file = is_dir = False
    if is_file:
        return _read_class_file(path)
    if "," not in text:
        if is_dir:
            raise ValueError(f"class list {spec!r} is a folder, expected a text file")
        if _looks_like_path(text):
            raise ValueError(
                f"class list file {spec!r} does not exist (to pass a single class name "
                "containing '/', end it with a comma)"
            )
    names = [(i, part.strip()) for i, part in enumerate(text.split(","), start=1)]
    return _validated([(i, n) for i, n in names if n], source=f"class list {spec!r}", unit="item")


def validate_class_names(names: Iterable[str], *, source: str = "class list") -> list[str]:
    """Strip and check a list of class names (non-empty strings, no duplicates, not empty)."""
    pairs = []
    for i, name in enumerate(names, start=1):
        if not isinstance(name, str):
            raise ValueError(f"{source}: item {i} is {type(name).__name__}, expected a string")
        pairs.append((i, name.strip()))
    return _validated(pairs, source=source, unit="item")


def _looks_like_path(text: str) -> bool:
    return (
        "/" in text
        or "\\" in text
        or text.startswith(("~", "."))
        or Path(text).suffix.lower() in _PATH_SUFFIXES
    )


def _read_class_file(path: Path) -> list[str]:
    path = path.expanduser()
    if path.is_dir():
        raise ValueError(f"class list {str(path)!r} is a folder, expected a text file")
    if not path.is_file():
        raise ValueError(f"class list file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"class list file {str(path)!r} is not UTF-8 text (byte {exc.start}: {exc.reason})"
        ) from None
    pairs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        name = line.strip()
        if name and not name.startswith("#"):
            pairs.append((lineno, name))
    return _validated(pairs, source=f"class list file {str(path)!r}", unit="line")


def _validated(pairs: Sequence[tuple[int, str]], *, source: str, unit: str) -> list[str]:
    if not pairs:
        raise ValueError(f"{source} has no class names")
    seen: dict[str, list[tuple[int, str]]] = {}
    for pos, name in pairs:
        if not display_name(name):
            raise ValueError(f"{source}, {unit} {pos}: class name {name!r} is blank")
        seen.setdefault(class_key(name), []).append((pos, name))
    dups = [group for group in seen.values() if len(group) > 1]
    if dups:
        parts = []
        for group in dups:
            spellings = " = ".join(dict.fromkeys(repr(n) for _, n in group))
            positions = ", ".join(str(p) for p, _ in group)
            parts.append(f"{spellings} ({unit}s {positions})")
        raise ValueError(f"{source} has duplicate class names: {'; '.join(parts)}")
    return [name for _, name in pairs]


# --------------------------------------------------------------------------- prompts


def display_name(class_name: str) -> str:
    """The class name as it goes into prompts: underscores read as spaces, spaces collapsed."""
    return " ".join(class_name.replace("_", " ").split())


# Class names are compared at three strengths, each the one place that defines it:
# class_key (same prompt), match_key (same name, spelled differently) and loose_key.


def class_key(name: str) -> str:
    """Names with the same key give the same CLIP prompt (the tokenizer lower-cases, and
    underscores read as spaces): such names are duplicates in one label set."""
    return display_name(name).casefold()


def match_key(name: str) -> str:
    """Lenient key for matching one source's names to another's: case, whitespace,
    underscores and hyphens folded ('Sea_Lion' = 'sea-lion' = 'sea lion')."""
    return " ".join(re.sub(r"[\s_\-]+", " ", name).split()).casefold()


def loose_key(name: str) -> str:
    """The most lenient key: letters and digits only ('Yorkshire Terrier.' = 'yorkshire_terrier')."""
    return re.sub(r"[\W_]+", "", name.casefold())


def validate_template(template: str) -> str:
    """Check that ``template`` has exactly one "{}" placeholder; return it unchanged."""
    if not isinstance(template, str):
        raise ValueError(f"prompt template must be a string, got {type(template).__name__}")
    count = template.count(PLACEHOLDER)
    if count != 1:
        others = sorted(set(re.findall(r"\{[^{}]+\}", template)))
        hint = f" (found {', '.join(others)}; write the placeholder as {{}})" if others else ""
        raise ValueError(
            f"prompt template {template!r} must contain exactly one '{{}}' placeholder for "
            f"the class name, found {count}{hint}"
        )
    return template


def fill_template(template: str, class_name: str) -> str:
    """``template`` with its "{}" replaced by ``display_name(class_name)``.

    Other braces in the template are kept literally (no ``str.format``).
    """
    validate_template(template)
    return template.replace(PLACEHOLDER, display_name(class_name), 1)
