"""Matching names (class folders, split-file classes, variants) onto class names."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from awt_engine.layouts.base import DatasetLayoutError
from awt_engine.registry import loose_key, match_key

NUMERIC_PREFIX = re.compile(r"\d+\.(.+)")
MAX_LISTED = 10


def note_missing_classes(notes: list[str], classes: Sequence[str], present: set[int]) -> None:
    missing = [c for i, c in enumerate(classes) if i not in present]
    if missing:
        notes.append(f"{len(missing)} of {len(classes)} classes have no images: {listing(missing)}")


def listing(names: Sequence[str], limit: int = MAX_LISTED) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --------------------------------------------------------------------------- name matching


FOLDS = (str.strip, match_key, loose_key)  # ever more lenient (awt_engine.registry)


@dataclass
class Matcher:
    """Finds a name's class index: exact first, then ever more lenient foldings."""

    classes: Sequence[str]
    synonyms: Sequence[tuple[str, str]] = ()
    _tables: list[dict[str, set[int]]] = field(default_factory=list)
    _synonyms: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for fold in FOLDS:
            table: dict[str, set[int]] = {}
            for i, c in enumerate(self.classes):
                table.setdefault(fold(c), set()).add(i)
            self._tables.append(table)
        self._synonyms = {loose_key(a): b for a, b in self.synonyms}

    def _direct(self, name: str) -> int | None:
        for fold, table in zip(FOLDS, self._tables, strict=True):
            hits = table.get(fold(name))
            if hits is not None and len(hits) == 1:
                return next(iter(hits))
        return None

    def find(self, name: str) -> int | None:
        candidates = [name]
        prefixed = NUMERIC_PREFIX.fullmatch(name)
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
        key = match_key(NUMERIC_PREFIX.sub(r"\1", name))
        return [folded[k] for k in difflib.get_close_matches(key, list(folded), n=n, cutoff=0.5)]


def match_names(
    names: Sequence[str],
    target: Sequence[str],
    *,
    synonyms: Sequence[tuple[str, str]],
    what: str,
    where: str,
    label: str,
) -> dict[str, int]:
    """Map every name onto an index of ``target``; DatasetLayoutError if any does not match."""
    matcher = Matcher(target, synonyms)
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
        for name in unmatched[:MAX_LISTED]:
            close = matcher.closest(name)
            hint = f" (closest: {', '.join(repr(c) for c in close)})" if close else ""
            parts.append(f"{name!r}{hint}")
        more = f" and {len(unmatched) - MAX_LISTED} more" if len(unmatched) > MAX_LISTED else ""
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
