"""Turning raw LLM answers into clean questions and description sentences."""

from __future__ import annotations

import re
from collections.abc import Iterable

from awt_engine.descriptions import fold_key

# "- x", "* x", "• x", "1. x", "1) x", "(1) x", "Q1: x" at the start of a line.
_BULLET = re.compile(r"^\s*(?:[-*•·–—]+|\(?\d{1,3}[.):]|\(?[A-Za-z][.)]|Q\d{1,3}[.):])\s+")
# A sentence ends at . ! or ? followed by space and a capital, digit or an opening quote.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'“(\[]?[A-Z0-9])")
_EMPHASIS = re.compile(r"\*\*|__|`")
# Control characters and U+FFFD (bytes that were not text): what a broken or tiny model emits,
# never part of a sentence worth showing CLIP.
_DEBRIS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ufffd]")

MIN_WORDS = 3  # "Banded texture." says nothing; real descriptions run 6-30 words.
MAX_CHARS = 300  # CLIP reads 77 tokens; a longer "sentence" is a paragraph that went wrong.


def _clean_line(line: str) -> str:
    line = _BULLET.sub("", line.strip(), count=1)
    line = _EMPHASIS.sub("", line).strip()
    if len(line) >= 2 and line[0] in "\"'“" and line[-1] in "\"'”":
        line = line[1:-1].strip()
    return line


def _lines(text: str, truncated: bool) -> list[str]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if truncated and lines:
        lines = lines[:-1]  # cut off by the token limit: the last line is unfinished
    return lines


def parse_questions(text: str, *, truncated: bool = False) -> list[str]:
    """Valid questions of one answer: exactly one ``{}``, no other braces, some words."""
    out = []
    for raw in _lines(text, truncated):
        q = _clean_line(raw)
        if q.count("{}") != 1:
            continue
        if "{" in q.replace("{}", "") or "}" in q.replace("{}", ""):
            continue
        if len(re.findall(r"[A-Za-z]+", q)) < 2:
            continue
        out.append(q)
    return dedupe(out)


def split_sentences(line: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(line) if s.strip()]


def is_valid_sentence(s: str) -> bool:
    if not s or len(s) > MAX_CHARS:
        return False
    if "{" in s or "}" in s:  # an unfilled placeholder or template debris
        return False
    if _DEBRIS.search(s):
        return False
    if s.endswith(":"):  # "Here are five sentences about X:"
        return False
    if len(re.findall(r"[^\W\d_]+", s)) < MIN_WORDS:
        return False
    return True


def parse_descriptions(text: str, *, truncated: bool = False) -> list[str]:
    """Stand-alone sentences of one answer: bullets removed, multi-sentence lines split,
    empty or malformed pieces dropped, duplicates (case and whitespace folded) removed."""
    out = []
    for raw in _lines(text, truncated):
        line = _clean_line(raw)
        if line.endswith(":"):
            continue
        for s in split_sentences(line):
            s = _clean_line(s)
            if is_valid_sentence(s):
                out.append(" ".join(s.split()))
    return dedupe(out)


def dedupe(items: Iterable[str], seen: set[str] | None = None) -> list[str]:
    """Items whose folded form is new, in order; ``seen`` (folded keys) is updated in place."""
    seen = set() if seen is None else seen
    out = []
    for item in items:
        key = fold_key(item)
        if key and key not in seen:
            seen.add(key)
            out.append(item)
    return out


def interleave(answers: list[list[str]]) -> list[str]:
    """First sentence of every answer, then every second one, ...: truncating the result keeps
    every question represented."""
    out = []
    for j in range(max((len(a) for a in answers), default=0)):
        out.extend(a[j] for a in answers if j < len(a))
    return out
