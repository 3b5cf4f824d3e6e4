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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from awt_engine._io import resolve_cache_root, sha256_hex
from awt_engine._progress import progress_bar
from awt_engine.describe.backends.base import ChatBackend, ChatRequest
from awt_engine.describe.errors import NoUsableOutputError
from awt_engine.describe.instructions import InstructionSet
from awt_engine.describe.parsing import dedupe, interleave, parse_descriptions, parse_questions
from awt_engine.describe.storage import Saver, open_cache, provenance
from awt_engine.describe.task import DescribeConfig, DescribeResult, DescribeTask
from awt_engine.descriptions import (
    DescriptionSet,
    descriptions_path,
    fold_key,
)

log = logging.getLogger("awt_engine.describe")


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
    descs = {c: list(existing.get(c, [])) for c in (classes or task.classes)}
    rounds = _Rounds(task, prompts, questions, config, descs, on_class_done, is_done, tally)
    pending = [c for c in descs if len(descs[c]) < config.per_class]
    for rnd in range(config.max_rounds):
        if not pending:
            break
        rounds.run(backend, rnd, pending)
        pending = [c for c in pending if c not in rounds.done]
    return descs


class _Rounds:
    """Step 2's state across its rounds (see :func:`generate_descriptions`): the classes'
    descriptions so far, their folded keys, where each class is in the question cycle, and
    the classes finished."""

    def __init__(
        self,
        task: DescribeTask,
        prompts: InstructionSet,
        questions: Sequence[str],
        config: DescribeConfig,
        descs: dict[str, list[str]],
        on_class_done: Callable[[str, list[str]], None] | None,
        is_done: Callable[[str], bool] | None,
        tally: AnswerTally | None,
    ) -> None:
        self.task, self.prompts, self.questions, self.config = task, prompts, questions, config
        self.descs, self.on_class_done, self.is_done, self.tally = (
            descs,
            on_class_done,
            is_done,
            tally,
        )
        per_class, n_q = config.per_class, len(questions)
        self.base_k = math.ceil(per_class / n_q)  # new sentences one answer must bring on average
        self.ask_k = config.sentences_per_answer or self.base_k + 1
        self.per_request = self.base_k * config.sampling.n
        self.seen = {c: {fold_key(d) for d in descs[c]} for c in descs}
        # Continue the question cycle where earlier descriptions would have left it.
        self.cursor = {c: math.ceil(len(descs[c]) / self.base_k) % n_q for c in descs}
        self.done: set[str] = {c for c in descs if len(descs[c]) >= per_class}

    def finish(self, c: str) -> None:
        self.done.add(c)
        if self.on_class_done is not None:
            self.on_class_done(c, self.descs[c])

    def run(self, backend: ChatBackend, rnd: int, classes_now: list[str]) -> None:
        """One round: every class of ``classes_now`` asked the questions it still needs."""
        last_round = rnd == self.config.max_rounds - 1
        requests, owners, answers = self._requests(rnd, classes_now)
        outstanding = {c: len(lists) for c, lists in answers.items()}

        def on_result(i: int, completions: list) -> None:
            c, j = owners[i]
            for comp in completions:
                parsed = parse_descriptions(comp.text, truncated=comp.truncated)
                if self.tally is not None:
                    self.tally.add(comp.text, len(parsed))
                answers[c][j].extend(parsed)
            outstanding[c] -= 1
            if outstanding[c] == 0:  # the class's answers of this round are all in
                self._class_answered(c, answers[c], last_round)

        if requests:
            backend.chat(requests, self.config.sampling, on_result)

    def _requests(
        self, rnd: int, classes_now: list[str]
    ) -> tuple[list[ChatRequest], list[tuple[str, int]], dict[str, list[list[str]]]]:
        """The round's requests, the (class, answer slot) each fills, and the empty slots."""
        n_q, is_done = len(self.questions), self.is_done
        requests: list[ChatRequest] = []
        owners: list[tuple[str, int]] = []
        answers: dict[str, list[list[str]]] = {}
        for c in classes_now:
            if is_done is not None and is_done(c):
                self.done.add(c)  # another run saved it in full meanwhile
                continue
            need = self.config.per_class - len(self.descs[c])
            m = min(n_q, math.ceil(need / self.per_request))
            for j in range(m):
                qi = (self.cursor[c] + j) % n_q
                conversation = self.prompts.description_conversation(
                    self.task.dataset_description, c, self.questions[qi], self.ask_k
                )
                seed = request_seed(self.config.sampling.seed, c, qi, rnd, len(self.descs[c]))
                wanted = None if is_done is None else (lambda c=c: not is_done(c))
                requests.append(ChatRequest(conversation, seed=seed, wanted=wanted))
                owners.append((c, j))
            self.cursor[c] = (self.cursor[c] + m) % n_q
            answers[c] = [[] for _ in range(m)]
        return requests, owners, answers

    def _class_answered(self, c: str, answers: list[list[str]], last_round: bool) -> None:
        if self.is_done is not None and self.is_done(c):
            self.done.add(c)  # another run saved it in full meanwhile: theirs is kept
            return
        descs, per_class = self.descs[c], self.config.per_class
        descs.extend(dedupe(interleave(answers), self.seen[c]))
        if len(descs) >= per_class:
            del descs[per_class:]
            self.finish(c)
        elif last_round:
            self.finish(c)


def _snippet(text: str | None, limit: int = 160) -> str:
    text = " ".join((text or "").split())
    return text[:limit] + ("..." if len(text) > limit else "")


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
    # replaced: the file --force set aside, overwritten by the first write, not merged
    existing, replaced, notes = open_cache(
        path, task.classes, task.dataset_description, force=force
    )
    run = _CacheRun(task, backend, config, prompts, path, existing, notes)
    final = run.ask(replaced, progress) if run.todo else None
    result_set = final or (run.build() if (run.todo or existing is None) else existing)
    return run.result(result_set, start)


class _CacheRun:
    """One :func:`describe_classes` run on its cache file: this run's descriptions, what it
    wrote, and the backend's counters at its start."""

    def __init__(
        self,
        task: DescribeTask,
        backend: ChatBackend,
        config: DescribeConfig,
        prompts: InstructionSet,
        path: Path,
        existing: DescriptionSet | None,
        notes: list[str],
    ) -> None:
        self.task, self.backend, self.config, self.prompts = task, backend, config, prompts
        self.path, self.existing, self.notes = path, existing, notes
        self.descs: dict[str, list[str]] = {}
        self.questions: tuple[str, ...] = ()
        if existing is not None:
            self.descs = {c: list(d) for c, d in existing.descriptions.items() if d}
            self.questions = existing.questions
        self.template = (
            task.template if task.template is not None else (existing and existing.template)
        )
        self.todo = [c for c in task.classes if len(self.descs.get(c, ())) < config.per_class]
        self.start_counts = {c: len(self.descs.get(c, ())) for c in self.todo}
        stats = backend.stats
        self.stats0 = (stats.requests, stats.retries, stats.generated_tokens, stats.rejected)
        self.tally = AnswerTally()
        self.provenance = existing.provenance if existing is not None else {}
        self.generated: list[str] = []
        self.questions_generated = False

    def build(self) -> DescriptionSet:
        # Only what this run wrote: the rest is in the file, and a file replaced meanwhile
        # (--force by another run) must not get the old classes back.
        return DescriptionSet(
            dataset=self.task.dataset,
            classes=self.task.classes,
            descriptions={c: self.descs[c] for c in self.generated},
            template=self.template or None,
            dataset_description=self.task.dataset_description,
            questions=self.questions,
            provenance=self.provenance,
        )

    def ask(self, replaced: tuple | None, progress: bool) -> DescriptionSet | None:
        """Ask for the ``todo`` classes, saving as they finish; the file as it is after."""
        self.provenance = provenance(
            self.backend, self.prompts, self.config, self.existing and self.existing.provenance
        )
        bar = _progress_bar(len(self.todo), self.task.dataset, progress)
        saver = Saver(
            self.path,
            self.config.save_every_s,
            self.config.per_class,
            self.build,
            replaces=replaced,
        )
        try:
            self._ask(saver, bar)
        finally:
            try:
                saver.close()
            finally:
                bar.close()
        final = saver.current()
        self._check_outcome(final)
        return final

    def _ask(self, saver: Saver, bar) -> None:
        def on_class_done(c: str, items: list[str]) -> None:
            # A class that gained nothing is left as it was (missing classes stay missing, so
            # a rerun asks again).
            if len(items) > len(self.descs.get(c, ())):
                with saver.lock:
                    self.descs[c] = list(items)
                    self.generated.append(c)
                saver.save()
            bar.update(1)

        if not self.questions:
            asked = tuple(
                generate_questions(
                    self.backend,
                    self.prompts,
                    self.task.dataset_description,
                    self.config,
                    self.notes,
                )
            )
            with saver.lock:
                self.questions = asked
            self.questions_generated = True
            merged = saver.save(force=True)  # a resumed run reuses these questions
            with saver.lock:  # a parallel run that saved its questions first wins
                self.questions = merged.questions
        generate_descriptions(
            self.backend,
            self.prompts,
            self.task,
            self.questions,
            self.config,
            existing=self.descs,
            classes=self.todo,
            on_class_done=on_class_done,
            is_done=saver.saved_full,
            tally=self.tally,
        )

    def _check_outcome(self, final: DescriptionSet | None) -> None:
        """Note the classes another run described; refuse a run that brought nothing."""
        elsewhere = [
            c
            for c in self.todo
            if c not in self.generated
            and final is not None
            and len(final.descriptions.get(c, ())) > self.start_counts[c]
        ]
        if elsewhere:
            self.notes.append(
                f"{len(elsewhere)} class(es) were described meanwhile by another run on "
                f"{self.path.name} and not asked again"
            )
        backend = self.backend
        rejected = backend.stats.rejected - self.stats0[3]
        if not self.generated and not elsewhere:
            raise NoUsableOutputError(
                f"the LLM ({backend.name}: {backend.model}) gave no new usable description for "
                f"any of {len(self.todo)} class(es): {_why_nothing(self.tally, rejected, backend)}. "
                f"Nothing already in {self.path} was lost."
            )
        self.notes.extend(_answer_notes(self.tally, rejected, backend))

    def result(self, result_set: DescriptionSet, start: float) -> DescribeResult:
        counts = result_set.counts()
        short = {c: n for c, n in counts.items() if n < self.config.per_class}
        stats = self.backend.stats
        return DescribeResult(
            descriptions=result_set,
            path=self.path,
            per_class=self.config.per_class,
            generated=self.generated,
            short=short,
            questions_generated=self.questions_generated,
            requests=stats.requests - self.stats0[0],
            retries=stats.retries - self.stats0[1],
            generated_tokens=stats.generated_tokens - self.stats0[2],
            seconds=time.perf_counter() - start,
            notes=self.notes,
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
