"""Finding input files: paths, folders (searched recursively by extension) and glob
patterns, in order and without duplicates. A folder that cannot be listed is reported
with a reason (:func:`find_images`), never skipped silently. Remote prefixes
(``s3://...``) are listed by Ray on its workers (:mod:`awt_engine.distributed`), with
:func:`input_extensions`' extensions.
"""

from __future__ import annotations

import glob
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from awt_engine.inputs.base import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, short_detail

_GLOB_CHARS = re.compile(r"[*?\[]")
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")  # s3://, gs://, hdfs://, ...


class UnreadableFolder(NamedTuple):
    """A folder that discovery could not list: its images are unknown, not absent."""

    path: str
    reason: str


@dataclass(frozen=True)
class FoundImages:
    """What :func:`find_images` found: image files, and folders it could not read."""

    images: list[Path]
    unreadable: list[UnreadableFolder]


def discover_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files named by ``inputs``, in order, without duplicates.

    :func:`find_images`'s images; each folder it could not read is named in a
    ``UserWarning`` (use :func:`find_images` to handle them, as ``classify`` does).
    """
    found = find_images(inputs)
    for folder in found.unreadable:
        warnings.warn(f"{folder.path}: {folder.reason}; the images in it are skipped", stacklevel=2)
    return found.images


def find_images(inputs: Sequence[str | os.PathLike]) -> FoundImages:
    """The image files named by ``inputs``, in order, without duplicates, and the
    folders that could not be read (permission denied...), sorted.

    * a file is taken as given, whatever its extension;
    * a folder is searched recursively for files with an extension in
      :data:`IMAGE_EXTENSIONS` or :data:`awt_engine.inputs.base.VIDEO_EXTENSIONS` (any case:
      images and videos may be mixed), sorted; names starting with "." (hidden files
      and folders, macOS "._" side files) are skipped; a folder (or subfolder) that
      cannot be listed is reported in ``unreadable``, never skipped silently;
    * anything else containing ``*``, ``?`` or ``[`` is a glob pattern (``**`` recursive):
      matched image files, plus the images inside matched folders, sorted.

    Raises ValueError naming every input that does not exist or matched no image (a
    folder with unreadable subfolders is not "empty": they are reported instead).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: list[Path] = []
    seen: set[str] = set()
    problems: list[str] = []
    unreadable: dict[str, UnreadableFolder] = {}

    def add(path: Path) -> None:
        key = os.path.normcase(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            found.append(path)

    def note(folder: UnreadableFolder) -> None:
        unreadable.setdefault(os.path.normcase(os.path.abspath(folder.path)), folder)

    for raw in inputs:
        if not isinstance(raw, (str, os.PathLike)):
            raise TypeError(f"image input must be a path or a pattern, got {type(raw).__name__}")
        images, locked, problem = _one_input(os.fspath(raw))
        if problem:
            problems.append(problem)
        for image in images:
            add(image)
        for folder in locked:
            note(folder)
    if problems:
        raise ValueError("no images found for: " + ", ".join(problems))
    return FoundImages(found, sorted(unreadable.values()))


def _one_input(text: str) -> tuple[list[Path], list[UnreadableFolder], str | None]:
    """What one input names: (files, unreadable folders, the problem when none)."""
    path = Path(text).expanduser()
    if path.is_file():
        return [path], [], None
    if path.is_dir():
        images, locked = _images_in_folder(path)
        empty = not images and not locked
        return (
            images,
            locked,
            f"{text!r} (folder holds no {_extension_list()} files)" if empty else None,
        )
    if _GLOB_CHARS.search(text):
        images, locked = _images_for_glob(os.path.expanduser(text))
        empty = not images and not locked
        return images, locked, f"{text!r} (pattern matched no image files)" if empty else None
    if path.exists():
        return [], [], f"{text!r} (not a regular file or folder)"
    return [], [], f"{text!r} (does not exist)"


def input_extensions() -> frozenset[str]:
    """Image and video extensions: what folders, globs and remote prefixes yield."""
    return IMAGE_EXTENSIONS | VIDEO_EXTENSIONS


def is_remote(text: str) -> bool:
    """Whether ``text`` is a remote URI (``s3://bucket/prefix/``), read by Ray."""
    return bool(_URI.match(text))


def _extension_list() -> str:
    return "/".join(sorted(input_extensions()))


def _is_image_name(name: str) -> bool:
    """An image's or a video's file name, by its extension."""
    return os.path.splitext(name)[1].lower() in input_extensions()


def _images_in_folder(folder: Path) -> tuple[list[Path], list[UnreadableFolder]]:
    out: list[Path] = []
    locked: list[UnreadableFolder] = []

    def unreadable(exc: OSError) -> None:  # os.walk skips the folder after this
        where = exc.filename if exc.filename is not None else folder
        locked.append(UnreadableFolder(os.fspath(where), _listing_reason(exc)))

    for root, dirs, files in os.walk(folder, onerror=unreadable):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and _is_image_name(name):
                out.append(Path(root, name))
    return sorted(out), locked


def _listing_reason(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "cannot read folder (permission denied)"
    return f"cannot read folder ({exc.strerror or short_detail(exc)})"


def _images_for_glob(pattern: str) -> tuple[list[Path], list[UnreadableFolder]]:
    out: list[Path] = []
    locked: list[UnreadableFolder] = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        path = Path(match)
        if path.is_dir():
            images, problems = _images_in_folder(path)
            out.extend(images)
            locked.extend(problems)
        elif path.is_file() and _is_image_name(path.name):
            out.append(path)
    return out, locked
