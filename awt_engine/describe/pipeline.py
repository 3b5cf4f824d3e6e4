"""The two-step, dataset-aware description pipeline and its resumable cache handling.

Problem: :class:`DescribeTask` (which classes, what data set). Solver settings:
:class:`DescribeConfig` (+ :class:`SamplingConfig`) and a :class:`ChatBackend`. Result:
:class:`DescribeResult`.

1. Questions: the LLM is told what the data set is and asked for open-ended questions with one
   ``{}`` for the class name (one worked example in the conversation). Valid ones are kept.
2. Descriptions: for every class and question the LLM is asked for several stand-alone
   sentences (two worked examples). Answers are parsed, de-duplicated and merged; classes still
   short are asked again, cycling on through the questions, for a bounded number of rounds.

All requests of a step go to the backend in one call (batched by vLLM / transformers,
concurrent over HTTP). Classes are written to the cache as they finish, so an interrupted run
keeps them and the same command resumes with what is missing. Every write merges into the file
under its lock, so parallel runs on one cache keep each other's classes and skip them.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import awt_engine
from awt_engine._io import resolve_cache_root, sha256_hex, utc_now
from awt_engine._progress import progress_bar
from awt_engine.describe.backends.base import ChatBackend, ChatRequest, SamplingConfig
from awt_engine.describe.errors import DescribeError, NoUsableOutputError
from awt_engine.describe.instructions import InstructionSet
from awt_engine.describe.parsing import dedupe, interleave, parse_descriptions, parse_questions
from awt_engine.descriptions import (
    DescriptionSet,
    backup_descriptions,
    dated_backup_path,
    descriptions_path,
    fold_key,
    load_descriptions,
    locked,
    save_descriptions,
    validate_dataset_name,
)
from awt_engine.registry import validate_class_names, validate_template

log = logging.getLogger("awt_engine.describe")


# ----------------------------------------------------------------------------------------------
# problem, settings, result
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DescribeTask:
    """What to describe: the cache name, the classes in label order, the data set's one-line
    description (what makes the questions dataset-aware) and its CLIP template."""

    dataset: str
    classes: tuple[str, ...]
    dataset_description: str
    template: str | None = None

    def __post_init__(self) -> None:
        validate_dataset_name(self.dataset)
        classes = tuple(self.classes)
        object.__setattr__(self, "classes", classes)
        if not classes:
            raise ValueError(f"data set {self.dataset!r}: the class list is empty")
        validate_class_names(classes, source=f"data set {self.dataset!r}")
        if not isinstance(self.dataset_description, str) or not self.dataset_description.strip():
            raise ValueError(
                f"data set {self.dataset!r} has no description; the questions are written for "
                "it (give --dataset-description, e.g. 'close-up photos of machine parts')"
            )
        if self.template is not None:
            validate_template(self.template)


@dataclass(frozen=True)
class DescribeConfig:
    # AWT uses 50 descriptions per class (P = 51 prompts with the bare one).
    per_class: int = 50
    # About 10 questions: each adds a distinct visual aspect; more mostly adds near-repeats.
    num_questions: int = 10
    # Fewer valid questions than this is reported: the descriptions then lack variety.
    min_questions: int = 5
    # Question requests before giving up on reaching num_questions.
    question_rounds: int = 3
    # Description rounds: one full pass over the questions plus top-ups; bounded so that a
    # model that keeps repeating itself cannot loop forever.
    max_rounds: int = 4
    # Sentences asked per answer; None: ceil(per_class / questions) + 1, the spare covering
    # duplicates and dropped lines.
    sentences_per_answer: int | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # Finished classes reach the cache within this many seconds (a timer writes them even when
    # no further class finishes; the end of the run and an interruption always write): a crash
    # loses at most a few seconds of work, while rewriting a 1000-class file after every class
    # would cost more I/O than the run is worth.
    save_every_s: float = 2.0

    def __post_init__(self) -> None:
        for name in ("per_class", "num_questions", "question_rounds", "max_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sentences_per_answer is not None and self.sentences_per_answer < 1:
            raise ValueError(f"sentences_per_answer must be >= 1, got {self.sentences_per_answer}")
        if not math.isfinite(self.save_every_s) or self.save_every_s <= 0:
            raise ValueError(
                f"save_every_s must be a finite number of seconds > 0, got {self.save_every_s}"
            )

    def to_json(self) -> dict:
        return {
            "per_class": self.per_class,
            "num_questions": self.num_questions,
            "max_rounds": self.max_rounds,
            "sentences_per_answer": self.sentences_per_answer,
        }


@dataclass
class DescribeResult:
    descriptions: DescriptionSet
    path: Path
    per_class: int
    generated: list[str]  # classes written or topped up by this run
    short: dict[str, int]  # classes below per_class, with their counts
    questions_generated: bool
    requests: int = 0
    retries: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        ds = self.descriptions
        counts = list(ds.counts().values())
        done = sum(n >= self.per_class for n in counts)
        lines = [
            f"{ds.dataset}: {done}/{len(ds.classes)} classes have >= {self.per_class} "
            f"descriptions ({len(self.generated)} described in this run); per class "
            f"min {min(counts)}, median {statistics.median(counts):g}; "
            f"{self.requests} requests ({self.retries} retries) in {self.seconds:.1f} s",
            f"cache: {self.path}",
        ]
        if self.short:
            items = [f"{c} ({n})" for c, n in self.short.items()]
            lines.append(
                f"short of {self.per_class}: {len(items)} class(es): "
                + ", ".join(items[:20])
                + (" ..." if len(items) > 20 else "")
                + " -- run the same command again to top them up"
            )
        return "\n".join(lines)


@dataclass
class AnswerTally:
    """How a run's description answers parsed: what says why a run found nothing."""

    answers: int = 0  # completions parsed
    unusable: int = 0  # of them, those without a single usable sentence
    example: str | None = None  # the first unusable one with any text in it

    def add(self, text: str, usable: int) -> None:
        self.answers += 1
        if not usable:
            self.unusable += 1
            if self.example is None and text.strip():
                self.example = text

    def describe(self) -> str:
        """One line on the unusable answers ("" when every answer held something)."""
        if not self.unusable:
            return ""
        if self.example is None:
            sample = "all of them were empty"
        else:
            sample = f"one began: {_snippet(self.example)!r}"
        if self.unusable == self.answers:
            what = f"every one of its {self.answers} answer(s) failed to parse"
        else:
            what = f"{self.unusable} of {self.answers} answer(s) held no usable sentence"
        return f"{what} (answers should be short sentences, one per line); {sample}"


# ----------------------------------------------------------------------------------------------
# the two steps
# ----------------------------------------------------------------------------------------------
def request_seed(base: int, *parts: object) -> int:
    """A per-request seed, stable across runs, different for every (class, question, round)."""
    return int(sha256_hex(str(base), *map(str, parts))[:8], 16) & 0x7FFFFFFF


def generate_questions(
    backend: ChatBackend,
    prompts: InstructionSet,
    dataset_description: str,
    config: DescribeConfig = DescribeConfig(),
    notes: list[str] | None = None,
) -> list[str]:
    """Step 1: up to ``num_questions`` valid questions (exactly one ``{}`` each)."""
    found: list[str] = []
    seen: set[str] = set()
    first_answer = None
    for rnd in range(config.question_rounds):
        if len(found) >= config.num_questions:
            break
        req = ChatRequest(
            prompts.question_conversation(dataset_description, config.num_questions),
            seed=request_seed(config.sampling.seed, "questions", rnd),
        )
        for comp in backend.chat([req], config.sampling)[0]:
            if first_answer is None:
                first_answer = comp.text
            found.extend(dedupe(parse_questions(comp.text, truncated=comp.truncated), seen))
    if not found:
        raise NoUsableOutputError(
            f"the LLM ({backend.name}: {backend.model}) gave no usable question in "
            f"{config.question_rounds} answer(s); a question must contain the class placeholder "
            f"{{}} exactly once. Its first answer began: {_snippet(first_answer)!r}"
        )
    if len(found) < config.min_questions:
        msg = (
            f"only {len(found)} usable question(s) (wanted {config.num_questions}); "
            "descriptions may lack variety"
        )
        log.info(msg)
        if notes is not None:
            notes.append(msg)
    return found[: config.num_questions]


def generate_descriptions(
    backend: ChatBackend,
    prompts: InstructionSet,
    task: DescribeTask,
    questions: Sequence[str],
    config: DescribeConfig = DescribeConfig(),
    *,
    existing: dict[str, list[str]] | None = None,
    classes: Sequence[str] | None = None,
    on_class_done: Callable[[str, list[str]], None] | None = None,
    is_done: Callable[[str], bool] | None = None,
    tally: AnswerTally | None = None,
) -> dict[str, list[str]]:
    """Step 2: descriptions for ``classes`` (default: all of the task's), each topped up to
    ``per_class`` on top of its ``existing`` ones.

    Round 0 asks every class the questions it needs (all of them for an empty class); each later
    round asks the still-short classes the *next* questions in the cycle, with new seeds. Within
    a round a class's answers are interleaved (first sentence of every answer, then the second,
    ...) so truncation keeps every question represented. ``on_class_done(name, descriptions)``
    is called once per class, as soon as it is full or the rounds are used up.

    ``is_done(name)`` True means the class is already saved in full elsewhere (another run on
    the same cache): it is not asked again, requests not yet sent for it are skipped, and
    ``on_class_done`` is not called for it. ``tally`` (if given) counts the answers that held
    no usable sentence and keeps one of them.
    """
    if not questions:
        raise ValueError("no questions to ask")
    existing = existing or {}
    per_class = config.per_class
    n_q = len(questions)
    base_k = math.ceil(per_class / n_q)  # new sentences one answer must bring on average
    ask_k = config.sentences_per_answer or base_k + 1
    per_request = base_k * config.sampling.n
    descs = {c: list(existing.get(c, [])) for c in (classes or task.classes)}
    seen = {c: {fold_key(d) for d in descs[c]} for c in descs}
    # Continue the question cycle where earlier descriptions would have left it.
    cursor = {c: math.ceil(len(descs[c]) / base_k) % n_q for c in descs}
    pending = [c for c in descs if len(descs[c]) < per_class]
    done: set[str] = set()

    def finish(c: str) -> None:
        done.add(c)
        if on_class_done is not None:
            on_class_done(c, descs[c])

    for c in [c for c in descs if c not in pending]:
        done.add(c)

    def run_round(rnd: int, classes_now: list[str]) -> None:
        last_round = rnd == config.max_rounds - 1
        requests: list[ChatRequest] = []
        owners: list[tuple[str, int]] = []
        answers: dict[str, list[list[str]]] = {}
        outstanding: dict[str, int] = {}
        for c in classes_now:
            if is_done is not None and is_done(c):
                done.add(c)  # another run saved it in full meanwhile
                continue
            need = per_class - len(descs[c])
            m = min(n_q, math.ceil(need / per_request))
            for j in range(m):
                qi = (cursor[c] + j) % n_q
                conversation = prompts.description_conversation(
                    task.dataset_description, c, questions[qi], ask_k
                )
                seed = request_seed(config.sampling.seed, c, qi, rnd, len(descs[c]))
                wanted = None if is_done is None else (lambda c=c: not is_done(c))
                requests.append(ChatRequest(conversation, seed=seed, wanted=wanted))
                owners.append((c, j))
            cursor[c] = (cursor[c] + m) % n_q
            answers[c] = [[] for _ in range(m)]
            outstanding[c] = m

        def on_result(i: int, completions: list) -> None:
            c, j = owners[i]
            for comp in completions:
                parsed = parse_descriptions(comp.text, truncated=comp.truncated)
                if tally is not None:
                    tally.add(comp.text, len(parsed))
                answers[c][j].extend(parsed)
            outstanding[c] -= 1
            if outstanding[c] == 0:  # the class's answers of this round are all in
                if is_done is not None and is_done(c):
                    done.add(c)  # another run saved it in full meanwhile: theirs is kept
                    return
                descs[c].extend(dedupe(interleave(answers[c]), seen[c]))
                if len(descs[c]) >= per_class:
                    del descs[c][per_class:]
                    finish(c)
                elif last_round:
                    finish(c)

        if requests:
            backend.chat(requests, config.sampling, on_result)

    for rnd in range(config.max_rounds):
        if not pending:
            break
        run_round(rnd, pending)
        pending = [c for c in pending if c not in done]
    return descs


# ----------------------------------------------------------------------------------------------
# the cache-aware driver
# ----------------------------------------------------------------------------------------------
def _snippet(text: str | None, limit: int = 160) -> str:
    text = " ".join((text or "").split())
    return text[:limit] + ("..." if len(text) > limit else "")


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


def _signature(path: Path) -> tuple[int, int, int, int] | None:
    """What changes whenever the file is replaced (a write renames a new file into place)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _same_recipe(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("backend", "model", "prompts_sha256", "sampling"))


def _merge(disk: DescriptionSet, ours: DescriptionSet, path: Path) -> DescriptionSet:
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
    if disk.provenance and not _same_recipe(disk.provenance, provenance):
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


class _Saver:
    """Writes the run's classes into the cache file without losing anyone else's.

    Each write holds the file's lock, re-reads the file, merges this run's classes into it
    (:func:`_merge`) and replaces it atomically, so runs sharing a cache end with the union of
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
                sig = _signature(self.path)
                disk = None
                if sig is not None and sig != self._replaces:
                    try:
                        disk = load_descriptions(self.path)
                    except ValueError as e:
                        raise DescribeError(
                            f"{self.path} was damaged by another process meanwhile ({e})"
                        ) from None
                merged = ours if disk is None else _merge(disk, ours, self.path)
                save_descriptions(merged, self.path)
                sig = _signature(self.path)
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
            sig = _signature(self.path)
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


def _provenance(
    backend: ChatBackend, prompts: InstructionSet, config: DescribeConfig, previous: dict | None
) -> dict:
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
        same = all(
            prev.get(k) == prov[k] for k in ("backend", "model", "prompts_sha256", "sampling")
        )
        if same:  # a resumed run of the same recipe: keep its creation time
            prov["created"] = prev.get("created", prov["created"])
            prov["updated"] = utc_now()
        else:
            history.append(prev)
        if history:
            prov["history"] = history
    return prov


def _check_resumable(existing: DescriptionSet, task: DescribeTask, path: Path) -> None:
    if existing.classes != task.classes:
        old, new = set(existing.classes), set(task.classes)
        if old == new:
            what = "the same classes in a different order"
        else:
            gone, added = sorted(old - new), sorted(new - old)
            what = (
                f"{len(existing.classes)} classes vs {len(task.classes)} requested; "
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
        and existing.dataset_description.strip() != task.dataset_description.strip()
    ):
        raise DescribeError(
            f"{path} was made for the data set description {existing.dataset_description!r}, "
            f"not {task.dataset_description!r}; its questions would not fit. Use --force to "
            "regenerate, or --name for a separate cache."
        )


def describe_classes(
    task: DescribeTask,
    backend: ChatBackend,
    config: DescribeConfig = DescribeConfig(),
    *,
    cache_path: str | Path | None = None,
    cache_root: str | Path | None = None,
    force: bool = False,
    progress: bool = False,
    prompts: InstructionSet | None = None,
) -> DescribeResult:
    """Describe ``task``'s classes into the cache, resuming whatever an earlier run finished.

    The cache file (default ``<cache root>/descriptions/<dataset>.json``) is read first: its
    questions are reused and classes that already have ``per_class`` descriptions are not asked
    again; short ones are topped up. ``force`` starts afresh (the old file is kept as
    ``<name>.json.<UTC time>.bak``). Classes are saved as they finish (within
    ``config.save_every_s``); on any error or interruption the finished ones are written before
    the exception propagates. Runs sharing the cache file merge into it under its lock and skip
    the classes another run has saved in full.
    """
    start = time.perf_counter()
    prompts = prompts or InstructionSet.load()
    path = (
        Path(cache_path)
        if cache_path is not None
        else descriptions_path(task.dataset, resolve_cache_root(cache_root))
    )
    notes: list[str] = []
    existing: DescriptionSet | None = None
    replaced = None  # the file --force set aside: overwritten by the first write, not merged
    if path.exists():
        if force:
            with locked(path):
                backup = backup_descriptions(path)
                replaced = _signature(path)
            notes.append(f"--force: the previous cache was kept as {backup}")
        else:
            existing = load_descriptions(path)  # ValueError naming the file if damaged
            _check_resumable(existing, task, path)

    descs: dict[str, list[str]] = {}
    questions: tuple[str, ...] = ()
    if existing is not None:
        descs = {c: list(d) for c, d in existing.descriptions.items() if d}
        questions = existing.questions
    template = task.template if task.template is not None else (existing and existing.template)
    todo = [c for c in task.classes if len(descs.get(c, ())) < config.per_class]
    start_counts = {c: len(descs.get(c, ())) for c in todo}
    stats0 = (
        backend.stats.requests,
        backend.stats.retries,
        backend.stats.generated_tokens,
        backend.stats.rejected,
    )
    tally = AnswerTally()
    provenance = existing.provenance if existing is not None else {}
    state = {"questions": questions, "provenance": provenance}
    generated: list[str] = []

    def build() -> DescriptionSet:
        # Only what this run wrote: the rest is in the file, and a file replaced meanwhile
        # (--force by another run) must not get the old classes back.
        return DescriptionSet(
            dataset=task.dataset,
            classes=task.classes,
            descriptions={c: descs[c] for c in generated},
            template=template or None,
            dataset_description=task.dataset_description,
            questions=state["questions"],
            provenance=state["provenance"],
        )

    questions_generated = False
    final: DescriptionSet | None = None
    if todo:
        state["provenance"] = _provenance(
            backend, prompts, config, existing and existing.provenance
        )
        bar = _progress_bar(len(todo), task.dataset, progress)
        saver = _Saver(path, config.save_every_s, config.per_class, build, replaces=replaced)

        def on_class_done(c: str, items: list[str]) -> None:
            # A class that gained nothing is left as it was (missing classes stay missing, so
            # a rerun asks again).
            if len(items) > len(descs.get(c, ())):
                with saver.lock:
                    descs[c] = list(items)
                    generated.append(c)
                saver.save()
            bar.update(1)

        try:
            if not state["questions"]:
                asked = tuple(
                    generate_questions(backend, prompts, task.dataset_description, config, notes)
                )
                with saver.lock:
                    state["questions"] = asked
                questions_generated = True
                merged = saver.save(force=True)  # a resumed run reuses these questions
                with saver.lock:  # a parallel run that saved its questions first wins
                    state["questions"] = merged.questions
            generate_descriptions(
                backend,
                prompts,
                task,
                state["questions"],
                config,
                existing=descs,
                classes=todo,
                on_class_done=on_class_done,
                is_done=saver.saved_full,
                tally=tally,
            )
        finally:
            try:
                saver.close()
            finally:
                bar.close()
        final = saver.current()
        elsewhere = [
            c
            for c in todo
            if c not in generated
            and final is not None
            and len(final.descriptions.get(c, ())) > start_counts[c]
        ]
        if elsewhere:
            notes.append(
                f"{len(elsewhere)} class(es) were described meanwhile by another run on "
                f"{path.name} and not asked again"
            )
        rejected = backend.stats.rejected - stats0[3]
        if not generated and not elsewhere:
            raise NoUsableOutputError(
                f"the LLM ({backend.name}: {backend.model}) gave no new usable description for "
                f"any of {len(todo)} class(es): {_why_nothing(tally, rejected, backend)}. "
                f"Nothing already in {path} was lost."
            )
        notes.extend(_answer_notes(tally, rejected, backend))

    result_set = final or (build() if (todo or existing is None) else existing)
    counts = result_set.counts()
    short = {c: n for c, n in counts.items() if n < config.per_class}
    return DescribeResult(
        descriptions=result_set,
        path=path,
        per_class=config.per_class,
        generated=generated,
        short=short,
        questions_generated=questions_generated,
        requests=backend.stats.requests - stats0[0],
        retries=backend.stats.retries - stats0[1],
        generated_tokens=backend.stats.generated_tokens - stats0[2],
        seconds=time.perf_counter() - start,
        notes=notes,
    )


def _rejection_text(rejected: int, backend: ChatBackend) -> str:
    first = backend.stats.first_rejection
    return f"{rejected} request(s) were given up" + (f" ({first})" if first else "")


def _why_nothing(tally: AnswerTally, rejected: int, backend: ChatBackend) -> str:
    """Why a run that asked for descriptions found none (for NoUsableOutputError)."""
    parts = []
    if rejected:
        parts.append(_rejection_text(rejected, backend))
    if tally.unusable:
        parts.append(tally.describe())
    if tally.answers > tally.unusable:
        parts.append("the usable answers only repeated descriptions already there")
    if not parts:
        parts.append("no answer came back")
    return "; ".join(parts)


def _answer_notes(tally: AnswerTally, rejected: int, backend: ChatBackend) -> list[str]:
    """What the summary should add about answers that brought nothing."""
    notes = []
    if rejected:
        notes.append(
            f"{_rejection_text(rejected, backend)}; the classes they were for may be short "
            "(run the same command again to top them up)"
        )
    if tally.unusable:
        notes.append(tally.describe())
    return notes


def _progress_bar(total: int, name: str, enabled: bool):
    return progress_bar(total, enabled, desc=f"describe {name}", unit="class")
