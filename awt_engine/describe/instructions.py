"""The LLM instructions of the description stage: plain text files, loaded by name.

These are what the description stage says to the LLM (system texts, requests and worked
examples), not the CLIP text prompts of :mod:`awt_engine.labels`. The files live in
``awt_engine/describe/instruction_texts/`` (package data, so an installed wheel has them);
``--instructions-dir`` reads a folder of edited copies instead. Every file used goes into a
SHA-256 recorded in the cache's provenance (``prompts_sha256``), so a changed text is
visible.

Placeholders use ``${name}`` (``string.Template``) because the texts themselves contain the
literal class placeholder ``{}``. Worked examples are files of ``key: value`` header lines, a
``---`` line, then the model's answer.
"""

from __future__ import annotations

import functools
import os
import string
from dataclasses import dataclass
from pathlib import Path

from awt_engine._io import sha256_hex
from awt_engine.registry import display_name

Message = dict[str, str]
Conversation = list[Message]

QUESTION_FILES = ("questions_system", "questions_user", "questions_example")
DESCRIPTION_FILES = (
    "descriptions_system",
    "descriptions_user",
    "descriptions_example_1",
    "descriptions_example_2",
)
ALL_FILES = QUESTION_FILES + DESCRIPTION_FILES


def default_instructions_dir() -> Path:
    """The packaged instruction texts."""
    return Path(__file__).resolve().parent / "instruction_texts"


def load_instruction(name: str, directory: str | os.PathLike | None = None) -> str:
    """The text of instruction ``name`` (file ``<name>.txt``), trailing whitespace removed."""
    folder = Path(directory) if directory is not None else default_instructions_dir()
    path = folder / f"{name}.txt"
    try:
        return path.read_text(encoding="utf-8").rstrip()
    except FileNotFoundError:
        have = sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []
        raise FileNotFoundError(
            f"instruction file {path} not found (instructions in {folder}: {', '.join(have) or 'none'})"
        ) from None


def fill_question(question: str, class_name: str) -> str:
    """Put the class name where the question's ``{}`` is (no str.format: braces stay safe)."""
    return question.replace("{}", display_name(class_name), 1)


@dataclass(frozen=True)
class Example:
    fields: dict[str, str]
    answer: str


def parse_example(text: str, name: str = "example") -> Example:
    head, sep, answer = text.partition("\n---\n")
    if not sep:
        raise ValueError(
            f"instruction {name}: expected 'key: value' lines, a '---' line, an answer"
        )
    fields = {}
    for line in head.splitlines():
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise ValueError(f"instruction {name}: header line {line!r} is not 'key: value'")
        fields[key.strip()] = value.strip()
    return Example(fields, answer.strip())


def _render(template: str, name: str, **values: object) -> str:
    try:
        return string.Template(template).substitute(**values)
    except (KeyError, ValueError) as e:
        raise ValueError(f"instruction {name}: bad or unknown placeholder ({e})") from None


@dataclass(frozen=True)
class InstructionSet:
    """All instruction texts of the stage, with their hashes."""

    texts: dict[str, str]
    directory: str

    @classmethod
    def load(cls, directory: str | os.PathLike | None = None) -> InstructionSet:
        folder = Path(directory) if directory is not None else default_instructions_dir()
        texts = {name: load_instruction(name, folder) for name in ALL_FILES}
        ps = cls(texts, str(folder))
        # Render once so a broken instruction file fails now, not after the model has loaded.
        ps.question_conversation("a check", 3)
        ps.description_conversation("a check", "thing", "What is {}?", 3)
        return ps

    @property
    def files_sha256(self) -> dict[str, str]:
        return {name: sha256_hex(self.texts[name]) for name in ALL_FILES}

    @property
    def sha256(self) -> str:
        """One hash over every instruction file (name and text)."""
        return sha256_hex(*(part for n in ALL_FILES for part in (n, self.texts[n])))

    def question_conversation(self, dataset_description: str, count: int) -> Conversation:
        ex = parse_example(self.texts["questions_example"], "questions_example")
        n_example = sum(1 for line in ex.answer.splitlines() if line.strip())
        user = self.texts["questions_user"]
        return [
            {"role": "system", "content": self.texts["questions_system"]},
            {
                "role": "user",
                "content": _render(
                    user,
                    "questions_user",
                    dataset_description=ex.fields.get("dataset", ""),
                    count=n_example,
                ),
            },
            {"role": "assistant", "content": ex.answer},
            {
                "role": "user",
                "content": _render(
                    user, "questions_user", dataset_description=dataset_description, count=count
                ),
            },
        ]

    @functools.cached_property
    def _description_examples(self) -> Conversation:
        """System message and the two worked examples (the same for every request)."""
        user = self.texts["descriptions_user"]
        messages: Conversation = [{"role": "system", "content": self.texts["descriptions_system"]}]
        for name in ("descriptions_example_1", "descriptions_example_2"):
            ex = parse_example(self.texts[name], name)
            n_example = sum(1 for line in ex.answer.splitlines() if line.strip())
            cls_name = ex.fields.get("class", "")
            messages.append(
                {
                    "role": "user",
                    "content": _render(
                        user,
                        name,
                        dataset_description=ex.fields.get("dataset", ""),
                        class_name=cls_name,
                        question=fill_question(ex.fields.get("question", "{}"), cls_name),
                        count=n_example,
                    ),
                }
            )
            messages.append({"role": "assistant", "content": ex.answer})
        return messages

    def description_conversation(
        self, dataset_description: str, class_name: str, question: str, count: int
    ) -> Conversation:
        messages = [dict(m) for m in self._description_examples]
        messages.append(
            {
                "role": "user",
                "content": _render(
                    self.texts["descriptions_user"],
                    "descriptions_user",
                    dataset_description=dataset_description,
                    class_name=display_name(class_name),
                    question=fill_question(question, class_name),
                    count=count,
                ),
            }
        )
        return messages
