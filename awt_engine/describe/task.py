"""What the describe pipeline is asked, how, and what it returns: :class:`DescribeTask`
(which classes of which data set), :class:`DescribeConfig` (the solver's settings, with
:class:`~awt_engine.describe.backends.base.SamplingConfig`) and :class:`DescribeResult`."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from awt_engine.describe.backends.base import SamplingConfig
from awt_engine.descriptions import DescriptionSet, validate_dataset_name
from awt_engine.registry import validate_class_names, validate_template

__all__ = ["DescribeConfig", "DescribeResult", "DescribeTask"]


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
