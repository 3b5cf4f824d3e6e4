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

import awt_engine
from awt_engine._io import resolve_cache_root, sha256_hex, utc_now
from awt_engine._progress import progress_bar
from awt_engine.describe.backends.base import ChatBackend, ChatRequest
from awt_engine.describe.errors import NoUsableOutputError
from awt_engine.describe.instructions import InstructionSet
from awt_engine.describe.parsing import dedupe, interleave, parse_descriptions, parse_questions
from awt_engine.describe.storage import Saver, open_cache
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


def _snippet(text: str | None, limit: int = 160) -> str:
    text = " ".join((text or "").split())
    return text[:limit] + ("..." if len(text) > limit else "")


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
        saver = Saver(path, config.save_every_s, config.per_class, build, replaces=replaced)

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
