"""The descriptions cache: LLM-written class descriptions, one JSON file per data set.

Format 1 (docs/design.md section 3)::

    {"format": 1, "dataset": "dtd", "dataset_description": "...", "template": "... {} ...",
     "classes": [...], "questions": [...], "descriptions": {class: [...]}, "provenance": {...}}

The plain form ``{class name: [descriptions]}`` that other AWT tools publish is accepted by
:func:`load_descriptions` and :func:`from_plain` and converted.

A file may be *partial*: the describe stage saves classes as they finish, so ``descriptions``
can lack some of ``classes`` (see :meth:`DescriptionSet.missing`). Readers that need every
class (``classify``) check :meth:`DescriptionSet.is_complete`.

Writers (``describe``, ``cache import``) hold :func:`locked` while they re-read and rewrite a
file, so parallel runs on one cache never overwrite each other's work; a replaced file is kept
as a dated backup (:func:`backup_descriptions`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from awt_engine._io import atomic_write, atomic_write_json, utc_now
from awt_engine.registry import match_key, validate_template

try:
    import fcntl
except ImportError:  # Windows: no advisory locks (writes stay atomic, merging is unguarded)
    fcntl = None

FORMAT_VERSION = 1

log = logging.getLogger("awt_engine.descriptions")

# A writer holds the lock only to re-read, merge and rewrite one file (well under a second even
# for 1000 classes), so waiting longer than this means a stuck process, not a busy one.
LOCK_TIMEOUT_S = 60.0
# How often a waiting writer retries: short next to a write, cheap next to an LLM request.
_LOCK_POLL_S = 0.02

# Data set names become file names: letters, digits and ``._+-`` only, not starting with a dot,
# so a name can never climb out of the cache folder or hide as a dot-file.
_DATASET_NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,127}")


def validate_dataset_name(name: str) -> str:
    """Return ``name`` if it is usable as a cache file name, else raise ValueError saying why."""
    if not isinstance(name, str) or not name:
        raise ValueError("data set name is empty")
    if "/" in name or "\\" in name or os.sep in name:
        raise ValueError(f"data set name {name!r} contains a path separator")
    if not _DATASET_NAME.fullmatch(name):
        raise ValueError(
            f"data set name {name!r} is not usable as a file name: use 1-128 letters, digits "
            "and '._+-', not starting with '.'"
        )
    return name


def fold_key(text: str) -> str:
    """Case- and whitespace-folded form of a text, used to find duplicates."""
    return " ".join(text.casefold().split())


@dataclass(frozen=True)
class DescriptionSet:
    """One data set's class descriptions plus what is needed to reproduce and use them.

    ``descriptions`` may lack classes (a partial cache being filled); it never holds a class
    that is not in ``classes``.
    """

    dataset: str
    classes: tuple[str, ...]  # label order
    descriptions: dict[str, list[str]]  # class -> descriptions
    template: str | None = None
    dataset_description: str | None = None
    questions: tuple[str, ...] = ()
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError("'dataset' must be a non-empty string")
        if isinstance(self.classes, str) or not isinstance(self.classes, Iterable):
            raise ValueError("'classes' must be a list of class names")
        classes = tuple(self.classes)
        if not classes:
            raise ValueError("'classes' is empty")
        for c in classes:
            if not isinstance(c, str) or not c.strip():
                raise ValueError(f"class names must be non-empty strings, got {c!r}")
        dupes = sorted(c for c, n in Counter(classes).items() if n > 1)  # O(C), not O(C^2)
        if dupes:
            raise ValueError(f"duplicate class names: {', '.join(map(repr, dupes))}")
        if not isinstance(self.descriptions, Mapping):
            raise ValueError("'descriptions' must map class names to lists of strings")
        known = set(classes)
        unknown = [k for k in self.descriptions if k not in known]
        if unknown:
            raise ValueError(
                f"'descriptions' has {len(unknown)} class(es) not in 'classes': "
                + ", ".join(map(repr, unknown[:5]))
                + (" ..." if len(unknown) > 5 else "")
            )
        descriptions: dict[str, list[str]] = {}
        for c in classes:  # keep label order
            if c not in self.descriptions:
                continue
            items = self.descriptions[c]
            if isinstance(items, str) or not isinstance(items, Iterable):
                raise ValueError(f"descriptions of class {c!r} must be a list of strings")
            items = list(items)
            bad = [d for d in items if not isinstance(d, str)]
            if bad:
                raise ValueError(f"descriptions of class {c!r} must be strings, got {bad[0]!r}")
            descriptions[c] = items
        questions = tuple(self.questions)
        for q in questions:
            if not isinstance(q, str):
                raise ValueError(f"questions must be strings, got {q!r}")
        if not isinstance(self.provenance, Mapping):
            raise ValueError("'provenance' must be a JSON object")
        if self.dataset_description is not None and not isinstance(self.dataset_description, str):
            raise ValueError("'dataset_description' must be a string")
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "descriptions", descriptions)
        object.__setattr__(self, "questions", questions)
        if self.template is not None:
            validate_template(self.template)
        object.__setattr__(self, "provenance", dict(self.provenance))

    # -- queries -----------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Number of descriptions per class, in label order (0 for a class not yet described)."""
        return {c: len(self.descriptions.get(c, ())) for c in self.classes}

    def missing(self, per_class: int = 1) -> dict[str, int]:
        """Classes with fewer than ``per_class`` descriptions, with their counts."""
        return {c: n for c, n in self.counts().items() if n < per_class}

    def is_complete(self, per_class: int = 1) -> bool:
        return not self.missing(per_class)

    def count_summary(self) -> dict[str, float]:
        """min / median / max descriptions per class and the total."""
        counts = list(self.counts().values())
        return {
            "min": min(counts),
            "median": statistics.median(counts),
            "max": max(counts),
            "total": sum(counts),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "dataset": self.dataset,
            "dataset_description": self.dataset_description,
            "template": self.template,
            "classes": list(self.classes),
            "questions": list(self.questions),
            "descriptions": {c: list(d) for c, d in self.descriptions.items()},
            "provenance": self.provenance,
        }


class CacheLockTimeout(TimeoutError):
    """Another process held a descriptions file's lock for longer than the wait allowed."""


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of a descriptions file: ``<name>.json.lock`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def locked(path: str | os.PathLike, timeout_s: float | None = None) -> Iterator[None]:
    """Hold the advisory lock of descriptions file ``path`` (``flock`` on ``<name>.json.lock``).

    Every writer takes it around re-reading and rewriting the file, so two processes never
    merge against the same old content. Waits at most ``timeout_s`` (default
    :data:`LOCK_TIMEOUT_S`), then raises :class:`CacheLockTimeout` naming the file. Where no
    lock can be had (no ``fcntl`` on Windows, a file system without ``flock``) it goes on
    unlocked: the write itself stays atomic.
    """
    path = Path(path)
    timeout = LOCK_TIMEOUT_S if timeout_s is None else timeout_s
    if fcntl is None:
        yield
        return
    lp = lock_path(path)
    lp.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    log.warning("%s: cannot lock (%s); writing without a lock", lp, e)
                    break
            if time.monotonic() >= deadline:
                raise CacheLockTimeout(
                    f"{path}: another process has held its lock ({lp.name}) for over "
                    f"{timeout:g} s; let the other awt-engine run finish and try again"
                )
            time.sleep(_LOCK_POLL_S)
        yield
    finally:
        os.close(fd)  # releases the lock


def dated_backup_path(path: str | os.PathLike) -> Path:
    """A free name ``<name>.json.<UTC time>.bak`` beside ``path`` (microseconds, then a counter,
    keep names unique even within one second)."""
    path = Path(path)
    stamp = utc_now(compact=True)
    for k in range(10_000):
        target = path.with_name(f"{path.name}.{stamp}{f'-{k}' if k else ''}.bak")
        if not target.exists():
            return target
    raise FileExistsError(f"{path}: no free backup name for {stamp}")


def backup_descriptions(path: str | os.PathLike) -> Path:
    """Copy ``path`` to a new dated backup beside it (see :func:`dated_backup_path`); return
    the backup's path. Call it holding :func:`locked` so no other writer picks the same name."""
    path = Path(path)
    target = dated_backup_path(path)
    with path.open("rb") as src:
        atomic_write(target, lambda out: shutil.copyfileobj(src, out))
    shutil.copystat(path, target)
    return target


def descriptions_path(dataset: str, cache_root: str | os.PathLike) -> Path:
    """``cache_root / "descriptions" / f"{dataset}.json"``; the name is validated first."""
    return Path(cache_root) / "descriptions" / f"{validate_dataset_name(dataset)}.json"


def _is_plain(obj: Mapping) -> bool:
    return "format" not in obj or isinstance(obj.get("format"), list)


def _is_cupl(obj: Mapping) -> bool:
    """CuPL's layout, ``{dataset: {class: [prompts]}}`` (what ``cache export`` writes)."""
    if len(obj) != 1:
        return False
    (inner,) = obj.values()
    return isinstance(inner, Mapping) and all(isinstance(v, list) for v in inner.values())


def load_descriptions(path: str | os.PathLike) -> DescriptionSet:
    """Read a format-1 file, a plain ``{class: [descriptions]}`` file, or CuPL's
    ``{dataset: {class: [descriptions]}}`` (so ``cache export -f cupl`` imports back).

    Raises FileNotFoundError when there is no file, and ValueError naming the file and what is
    wrong with it when it is damaged or has the wrong shape.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such descriptions file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder, not a descriptions file") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: damaged descriptions file, not valid JSON "
            f"(line {e.lineno}, column {e.colno}: {e.msg})"
        ) from None
    except RecursionError:
        raise ValueError(
            f"{path}: not a descriptions file: its JSON is nested too deeply to read "
            "(a descriptions file is an object of lists of strings)"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path}: expected a JSON object (format {FORMAT_VERSION} or "
            f"{{class: [descriptions]}}), found a {type(obj).__name__}"
        )
    try:
        if _is_cupl(obj):
            ((name, inner),) = obj.items()
            return from_plain(inner, dataset=name if _DATASET_NAME.fullmatch(name) else path.stem)
        if _is_plain(obj):
            return from_plain(obj, dataset=path.stem)
        return _from_format(obj)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _from_format(obj: Mapping[str, Any]) -> DescriptionSet:
    version = obj["format"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"'format' must be an integer, found {version!r}")
    if version != FORMAT_VERSION:
        newer = " (written by a newer awt-engine?)" if version > FORMAT_VERSION else ""
        raise ValueError(
            f"descriptions format {version} is not supported{newer}; this awt-engine reads "
            f"format {FORMAT_VERSION}"
        )
    missing = [k for k in ("dataset", "classes", "descriptions") if k not in obj]
    if missing:
        raise ValueError(f"missing key(s): {', '.join(missing)}")
    classes = obj["classes"]
    if not isinstance(classes, list):
        raise ValueError("'classes' must be a list of class names")
    questions = obj.get("questions") or []
    if not isinstance(questions, list):
        raise ValueError("'questions' must be a list of strings")
    provenance = obj.get("provenance") or {}
    return DescriptionSet(
        dataset=obj["dataset"],
        classes=tuple(classes),
        descriptions=obj["descriptions"],
        template=obj.get("template"),
        dataset_description=obj.get("dataset_description"),
        questions=tuple(questions),
        provenance=provenance,
    )


def save_descriptions(ds: DescriptionSet, path: str | os.PathLike) -> None:
    """Write ``ds`` as format 1, atomically (readers see the old file or the new one)."""
    atomic_write_json(path, ds.to_json())


def from_plain(
    mapping: Mapping[str, list[str]],
    dataset: str,
    *,
    template: str | None = None,
    dataset_description: str | None = None,
    classes: Iterable[str] | None = None,
) -> DescriptionSet:
    """Convert ``{class name: [descriptions]}`` into a :class:`DescriptionSet`.

    Descriptions are stripped; empty ones are dropped. Without ``classes`` the label order is
    the mapping's order. With ``classes`` (e.g. a registry's list), the mapping's names are
    matched to them with case, ``_``/``-`` and whitespace folded ('Sea_Lion' -> 'sea lion');
    a name in the mapping that matches no class is an error, a class the mapping lacks is left
    missing (the describe stage can fill it).
    """
    if not isinstance(mapping, Mapping):
        raise ValueError(f"expected {{class: [descriptions]}}, found a {type(mapping).__name__}")
    if not mapping:
        raise ValueError("no classes in the descriptions mapping")
    cleaned: dict[str, list[str]] = {}
    for name, items in mapping.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class names must be non-empty strings, got {name!r}")
        if isinstance(items, str) or not isinstance(items, list):
            raise ValueError(
                f"descriptions of class {name!r} must be a list of strings, "
                f"found {type(items).__name__}"
            )
        bad = [d for d in items if not isinstance(d, str)]
        if bad:
            raise ValueError(f"descriptions of class {name!r} must be strings, got {bad[0]!r}")
        cleaned[name] = [d.strip() for d in items if d.strip()]

    if classes is None:
        label_order = tuple(cleaned)
        descriptions = cleaned
    else:
        label_order = tuple(classes)
        by_fold: dict[str, str] = {}
        for c in label_order:
            key = match_key(c)
            if key in by_fold and by_fold[key] != c:
                raise ValueError(f"classes {by_fold[key]!r} and {c!r} cannot be told apart")
            by_fold[key] = c
        descriptions = {}
        unmatched = []
        for name, items in cleaned.items():
            target = name if name in label_order else by_fold.get(match_key(name))
            if target is None:
                unmatched.append(name)
                continue
            if target in descriptions:
                raise ValueError(f"classes {name!r} and another entry both match class {target!r}")
            descriptions[target] = items
        if unmatched:
            raise ValueError(
                f"{len(unmatched)} class name(s) match no class of data set {dataset!r}: "
                + ", ".join(map(repr, unmatched[:5]))
                + (" ..." if len(unmatched) > 5 else "")
            )
    return DescriptionSet(
        dataset=dataset,
        classes=label_order,
        descriptions=descriptions,
        template=template,
        dataset_description=dataset_description,
    )


def export_cupl(ds: DescriptionSet) -> dict[str, dict[str, list[str]]]:
    """``{dataset: {class: [prompts]}}``, the CuPL-style layout other zero-shot tools read.

    The prompts are the descriptions themselves (CuPL feeds its LLM sentences to CLIP as they
    are), in label order; classes without descriptions are left out.
    """
    return {ds.dataset: {c: list(ds.descriptions[c]) for c in ds.classes if c in ds.descriptions}}


__all__ = [
    "FORMAT_VERSION",
    "LOCK_TIMEOUT_S",
    "CacheLockTimeout",
    "DescriptionSet",
    "backup_descriptions",
    "dated_backup_path",
    "descriptions_path",
    "export_cupl",
    "fold_key",
    "from_plain",
    "load_descriptions",
    "lock_path",
    "locked",
    "save_descriptions",
    "validate_dataset_name",
]
