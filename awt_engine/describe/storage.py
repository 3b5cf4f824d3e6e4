"""The description cache as the describe pipeline writes it: what a file holds, resuming
from it, and writing into it while other runs do the same.

Every write holds the file's lock (:func:`awt_engine.descriptions.locked`), re-reads it,
merges this run's classes into it (:func:`merge`: per class the longer list wins, the file's
questions win) and replaces it atomically, so runs sharing a cache end with the union of
their work. :class:`Saver` batches those writes in time (a timer thread) and, when the last
write fails, puts this run's classes in a dated backup instead of losing them. The file
format itself is :mod:`awt_engine.descriptions`'.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import awt_engine
from awt_engine._io import utc_now
from awt_engine.describe.errors import DescribeError
from awt_engine.descriptions import (
    DescriptionSet,
    backup_descriptions,
    dated_backup_path,
    load_descriptions,
    locked,
    save_descriptions,
)

if TYPE_CHECKING:
    from awt_engine.describe.backends.base import ChatBackend
    from awt_engine.describe.instructions import InstructionSet
    from awt_engine.describe.task import DescribeConfig

__all__ = [
    "Saver",
    "check_resumable",
    "merge",
    "open_cache",
    "provenance",
    "same_recipe",
    "saved_state",
    "signature",
]

log = logging.getLogger("awt_engine.describe")


def saved_state(path: str | Path | None, per_class: int) -> tuple[str, bool]:
    """What the cache file holds, in words, read back from it (so it is true after an
    interruption whatever had finished), and whether it holds anything to resume from."""
    if not path:
        return "nothing was saved", False
    try:
        ds = load_descriptions(path)
    except FileNotFoundError:
        return f"nothing was saved ({path} was not written)", False
    except (OSError, ValueError) as e:
        return f"{path} could not be read back ({e})", False
    counts = ds.counts()
    described = sum(n > 0 for n in counts.values())
    full = sum(n >= per_class for n in counts.values())
    if not described:
        held = "only the questions" if ds.questions else "no descriptions"
        return f"no class was saved ({path} holds {held})", bool(ds.questions)
    return (
        f"{described} of {len(counts)} classes saved in {path} ({full} with all {per_class} "
        "descriptions)",
        True,
    )


def signature(path: Path) -> tuple[int, int, int, int] | None:
    """What changes whenever the file is replaced (a write renames a new file into place)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def same_recipe(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("backend", "model", "prompts_sha256", "sampling"))


def merge(disk: DescriptionSet, ours: DescriptionSet, path: Path) -> DescriptionSet:
    """``ours`` written into ``disk`` (the file as it is now): per class the longer list wins (a
    tie keeps the file's), so no finished class is lost; the file's questions win, so parallel
    runs ask the same ones. Another recipe's provenance is kept in the history."""
    if disk.classes != ours.classes:
        raise DescribeError(
            f"{path} was replaced by another process meanwhile and now holds a different class "
            f"list ({len(disk.classes)} classes, this run has {len(ours.classes)}); this run's "
            "classes cannot be merged into it"
        )
    descriptions = {}
    for c in ours.classes:
        theirs, mine = disk.descriptions.get(c, []), ours.descriptions.get(c, [])
        best = mine if len(mine) > len(theirs) else theirs
        if best:
            descriptions[c] = best
    provenance = dict(ours.provenance)
    if disk.provenance and not same_recipe(disk.provenance, provenance):
        other = {k: v for k, v in disk.provenance.items() if k != "history"}
        history = list(provenance.get("history", []))
        if other not in history:
            provenance["history"] = [*history, other]
    return DescriptionSet(
        dataset=ours.dataset,
        classes=ours.classes,
        descriptions=descriptions,
        template=ours.template or disk.template,
        dataset_description=ours.dataset_description or disk.dataset_description,
        questions=disk.questions or ours.questions,
        provenance=provenance,
    )


class Saver:
    """Writes the run's classes into the cache file without losing anyone else's.

    Each write holds the file's lock, re-reads the file, merges this run's classes into it
    (:func:`merge`) and replaces it atomically, so runs sharing a cache end with the union of
    their work. A change is written at once when ``interval`` seconds have passed since the last
    write, else by a timer thread within ``interval``; :meth:`close` writes what is left.
    ``build()`` (this run's state) is called holding :attr:`lock`; change that state under it.
    :meth:`saved_full` says whether the file already holds a class in full (re-reading the
    file when it changed), so a run can skip the classes another run finished.
    """

    def __init__(
        self,
        path: Path,
        interval: float,
        per_class: int,
        build: Callable[[], DescriptionSet],
        *,
        replaces: tuple | None = None,
    ) -> None:
        self.path = path
        self.interval = interval
        self.per_class = per_class
        self.build = build
        self.lock = threading.RLock()
        self.writes = 0
        self.last = -math.inf
        self._write_lock = threading.Lock()  # one write at a time from this process
        self._disk_lock = threading.Lock()  # guards disk / _sig
        self._version = self._saved = 0  # changes noted / written
        # The file that --force set aside: the first write replaces it instead of merging.
        self._replaces = replaces
        self.disk: DescriptionSet | None = None  # the file as last read or written
        self._sig: tuple | bool | None = False  # its signature; False: not read yet
        self._error: BaseException | None = None  # a failed timer write, raised by save()
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._tick, name="awt-describe-saver", daemon=True)
        self._timer.start()

    @property
    def dirty(self) -> bool:
        return self._version != self._saved

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            if self.dirty:
                try:
                    self.write()
                except Exception as e:  # surfaced by the next save() or close()
                    log.warning("could not write %s: %s", self.path, e)
                    self._error = e

    def save(self, force: bool = False) -> DescriptionSet | None:
        """Note a change; write now (returning the merged file) if forced or if ``interval``
        has passed since the last write, else leave it to the timer."""
        with self.lock:
            self._version += 1
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if force or time.monotonic() - self.last >= self.interval:
            return self.write()
        return None

    def write(self) -> DescriptionSet:
        with self._write_lock:
            with self.lock:
                version = self._version
                ours = self.build()
            with locked(self.path):
                sig = signature(self.path)
                disk = None
                if sig is not None and sig != self._replaces:
                    try:
                        disk = load_descriptions(self.path)
                    except ValueError as e:
                        raise DescribeError(
                            f"{self.path} was damaged by another process meanwhile ({e})"
                        ) from None
                merged = ours if disk is None else merge(disk, ours, self.path)
                save_descriptions(merged, self.path)
                sig = signature(self.path)
            with self._disk_lock:
                self.disk, self._sig = merged, sig
            with self.lock:
                self._saved = max(self._saved, version)
            self.last = time.monotonic()
            self.writes += 1
            return merged

    def current(self) -> DescriptionSet | None:
        """The file as it is now (re-read if another process replaced it)."""
        with self._disk_lock:
            sig = signature(self.path)
            if sig != self._sig:
                self._sig = sig
                self.disk = None
                if sig is not None and sig != self._replaces:
                    try:
                        self.disk = load_descriptions(self.path)
                    except (OSError, ValueError):
                        self.disk = None
            return self.disk

    def saved_full(self, name: str) -> bool:
        disk = self.current()
        return disk is not None and len(disk.descriptions.get(name, ())) >= self.per_class

    def close(self) -> None:
        """Stop the timer and write what is left. If that fails (the file was replaced by
        other classes, the lock stayed taken), this run's classes go to a dated backup, named
        in the error, so nothing is lost."""
        self._stop.set()
        self._timer.join()
        self._error = None  # retried just below
        if not self.dirty:
            return
        try:
            self.write()
        except Exception as e:
            try:
                with self.lock:
                    ours = self.build()
                aside = dated_backup_path(self.path)
                save_descriptions(ours, aside)
            except Exception:  # the original error is the one to report
                raise e from None
            raise DescribeError(
                f"could not write {self.path}: {e}. This run's descriptions were saved as "
                f"{aside} instead (nothing is lost)"
            ) from e


def check_resumable(
    existing: DescriptionSet, classes: tuple[str, ...], dataset_description: str, path: Path
) -> None:
    """Refuse to resume ``existing`` (the file at ``path``) for another class list, or for
    another data set description when its questions were written for the old one."""
    if existing.classes != classes:
        old, new = set(existing.classes), set(classes)
        if old == new:
            what = "the same classes in a different order"
        else:
            gone, added = sorted(old - new), sorted(new - old)
            what = (
                f"{len(existing.classes)} classes vs {len(classes)} requested; "
                f"only in the cache: {gone[:3]}, only requested: {added[:3]}"
            )
        raise DescribeError(
            f"{path} holds a different class list ({what}). Use --force to regenerate it "
            "(the old file is kept as a dated .bak beside it), or --name to write a separate "
            "cache."
        )
    if (
        existing.dataset_description
        and existing.questions
        and existing.dataset_description.strip() != dataset_description.strip()
    ):
        raise DescribeError(
            f"{path} was made for the data set description {existing.dataset_description!r}, "
            f"not {dataset_description!r}; its questions would not fit. Use --force to "
            "regenerate, or --name for a separate cache."
        )


def open_cache(
    path: Path, classes: tuple[str, ...], dataset_description: str, *, force: bool
) -> tuple[DescriptionSet | None, tuple | None, list[str]]:
    """Read the cache file at ``path`` before a run: (what it holds to resume from, the
    signature of the file ``force`` set aside, notes). ``force`` keeps the old file as a
    dated backup and resumes from nothing; without it the file must fit the run
    (:func:`check_resumable`; a damaged file is a ValueError naming it)."""
    notes: list[str] = []
    if not path.exists():
        return None, None, notes
    if force:
        with locked(path):
            backup = backup_descriptions(path)
            replaced = signature(path)
        notes.append(f"--force: the previous cache was kept as {backup}")
        return None, replaced, notes
    existing = load_descriptions(path)  # ValueError naming the file if damaged
    check_resumable(existing, classes, dataset_description, path)
    return existing, None, notes


def provenance(
    backend: ChatBackend, prompts: InstructionSet, config: DescribeConfig, previous: dict | None
) -> dict:
    """The provenance a run records in the file: backend, model, sampling, prompts. A resumed
    run of the ``previous`` recipe keeps its creation time; another recipe's goes to the
    history."""
    prov = {
        "backend": backend.name,
        "model": backend.model,
        "backend_settings": backend.settings(),
        "sampling": config.sampling.to_json(),
        "describe": config.to_json(),
        "prompts_sha256": prompts.sha256,
        "prompt_files_sha256": prompts.files_sha256,
        "created": utc_now(),
        "engine_version": awt_engine.__version__,
    }
    if previous:
        history = list(previous.get("history", []))
        prev = {k: v for k, v in previous.items() if k != "history"}
        if same_recipe(prev, prov):  # a resumed run of the same recipe: keep its creation time
            prov["created"] = prev.get("created", prov["created"])
            prov["updated"] = utc_now()
        else:
            history.append(prev)
        if history:
            prov["history"] = history
    return prov
