"""Eval result records (DESIGN section 3.4) gathered into one table: a row per data set,
a column per (model or trained method, scorer), the average over data sets below.

As CLIP_benchmark's ``build`` gathers its per-run JSONs into one table, but pivoted the
way the CoOp and AWT papers print theirs. A cell holds every run of its (data set,
column), e.g. the seeds of a few-shot protocol: it shows their mean and, for more than
one, their standard deviation (population, as CoOp's ``parse_test_res.py`` and
:func:`~awt_engine.metrics.metrics_std`). The same run read twice (same ``run_id`` and
scorer) counts once. A column's average is the mean of its cells' means over the data
sets it has; a missing cell is ``-`` and left out of the average, with a note naming it.

Base-to-new results (records with subsample ``base`` and ``new``, CoOp's and CoCoOp's
protocol) get a third column beside their pair for an accuracy metric, ``[HM]``: per data
set the harmonic mean 2BN / (B + N) of the base and new cell means, and below it the
harmonic mean of the two columns' averages over the data sets that have both (CoCoOp's
Table 1 averages that way, not the mean of the per-set harmonic means).

Summaries this package writes beside results (``summary.json``) carry
``"format": SUMMARY_FORMAT`` and are passed over by :func:`read_results`; any other file
that is not an eval record is an error naming it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUMMARY_FORMAT = "awt-engine-summary"
REQUIRED = ("dataset", "model", "metrics", "scorer", "run_id")
# Every figure of an eval record's metrics: metrics.NUMBERS, written out so that the
# CLI's results command loads no torch (tests/test_results_table.py checks they agree).
METRICS = (
    "acc1",
    "acc5",
    "mean_per_class_recall",
    "ece",
    "ece_adaptive",
    "nll",
    "brier",
    "aurc",
    "ood_auroc",
    "ood_fpr95",
)
_PERCENT = {"acc1", "acc5", "mean_per_class_recall", "ece", "ece_adaptive", "aurc"}
_PERCENT |= {"ood_auroc", "ood_fpr95"}
_TITLES = {"acc1": "top-1 accuracy", "acc5": "top-5 accuracy"}
# The metrics whose base and new columns get a harmonic-mean column (accuracies).
HARMONIC_METRICS = ("acc1", "acc5", "mean_per_class_recall")
_BASE, _NEW, _HM = " [base]", " [new]", " [HM]"


class NotAnEvalResult(ValueError):
    """A file given as an eval result is not one (the message names it and why)."""


@dataclass(frozen=True)
class ReadResults:
    records: list[dict]
    sources: list[Path]  # the file of each record
    summaries: list[Path]  # summary files passed over


def read_results(paths: Iterable[str | Path]) -> ReadResults:
    """The eval records of ``paths``: JSON files, or folders searched recursively for
    ``*.json``. NotAnEvalResult names a file that is not one; ValueError a path that
    does not exist or a folder without any."""
    records, sources, summaries = [], [], []
    for given in paths:
        given = Path(given).expanduser()
        if given.is_dir():
            files = sorted(given.rglob("*.json"))
            if not files:
                raise ValueError(f"{given}: no .json files in it")
        elif given.is_file():
            files = [given]
        else:
            raise ValueError(f"{given}: no such file or folder")
        for path in files:
            rec = _read_one(path)
            if rec is None:
                summaries.append(path)
            else:
                records.append(rec)
                sources.append(path)
    return ReadResults(records, sources, summaries)


def _read_one(path: Path) -> dict | None:
    """One eval record; None for a summary."""
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise NotAnEvalResult(
            f"{path}: not an eval result (cannot read it as JSON: {exc})"
        ) from None
    if isinstance(rec, dict) and rec.get("format") == SUMMARY_FORMAT:
        return None
    if not isinstance(rec, dict):
        raise NotAnEvalResult(f"{path}: not an eval result (a JSON {type(rec).__name__})")
    missing = [k for k in REQUIRED if k not in rec]
    if missing or not isinstance(rec["metrics"], dict):
        what = f"no {', '.join(missing)}" if missing else "its metrics are not an object"
        raise NotAnEvalResult(
            f"{path}: not an eval result of awt-engine ({what}; `awt-engine eval -o` writes them)"
        )
    return rec


def _column_key(rec: dict) -> tuple:
    """Columns in a fixed order whatever order the files were read in: zero-shot models
    first, then each method by shot count; scorers by name, plain before adapted."""
    sub = rec.get("subsample") or "all"
    return (
        rec.get("method") or "",
        rec.get("shots") or 0,
        rec["model"],
        rec["scorer"],
        rec.get("adapt") or "",
        ("all", "base", "new").index(sub) if sub in ("all", "base", "new") else 3,
    )


def _row_key(name: str) -> tuple:
    """The papers' data sets in their tables' order, then the others by name."""
    from awt_engine.eval_runs import COOP11

    return (COOP11.index(name), "") if name in COOP11 else (len(COOP11), name)


def column_of(rec: dict) -> str:
    """The column a record falls in: the model, or the trained method with its shots and
    backbone; then the scorer (adapted: ``awt+tda``) and a class subset other than all."""
    model = rec["model"]
    method = rec.get("method")
    if method:
        shots = rec.get("shots")
        model = f"{method} {shots}-shot {model}" if shots else f"{method} {model}"
    scorer = rec["scorer"] + (f"+{rec['adapt']}" if rec.get("adapt") else "")
    sub = rec.get("subsample") or "all"
    return f"{model} / {scorer}" + (f" [{sub}]" if sub != "all" else "")


@dataclass(frozen=True)
class Cell:
    values: tuple[float, ...]  # one per run, as recorded (fractions for accuracies)

    @property
    def mean(self) -> float:
        return math.fsum(self.values) / len(self.values)

    @property
    def std(self) -> float | None:
        """Population standard deviation over the runs; None for one run."""
        if len(self.values) < 2:
            return None
        m = self.mean
        return math.sqrt(math.fsum((v - m) ** 2 for v in self.values) / len(self.values))


@dataclass(frozen=True)
class Average:
    value: float | None  # mean of the column's cell means; None when it has none
    missing: tuple[str, ...]  # rows without a cell in this column


@dataclass(frozen=True)
class ResultsTable:
    metric: str
    rows: tuple[str, ...]  # data sets: the papers' order, then by name
    columns: tuple[str, ...]
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    # an [HM] column -> its (base, new) columns; its cells are derived from theirs
    harmonic: dict[str, tuple[str, str]] = field(default_factory=dict)

    def average(self, column: str) -> Average:
        """The mean of the column's cell means; for an [HM] column, the harmonic mean of
        its base and new columns' averages over the rows that have both."""
        have = [r for r in self.rows if (r, column) in self.cells]
        missing = tuple(r for r in self.rows if (r, column) not in self.cells)
        if not have:
            return Average(None, missing)
        if column in self.harmonic:
            base, new = (
                math.fsum(self.cells[(r, c)].mean for r in have) / len(have)
                for c in self.harmonic[column]
            )
            return Average(harmonic_mean(base, new), missing)
        return Average(math.fsum(self.cells[(r, column)].mean for r in have) / len(have), missing)


def harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b); 0 when both are 0."""
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def results_table(records: Sequence[dict], metric: str = "acc1") -> ResultsTable:
    """The table of ``records`` for ``metric`` (a name of the records' ``metrics``). A
    record whose metric is null (nothing scored; acc5 with < 5 classes) makes no cell."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    rows: set[str] = set()
    columns: dict[str, tuple] = {}
    runs: dict[tuple[str, str], dict[tuple[str, str], float]] = {}
    for rec in records:
        row, col = str(rec["dataset"]), column_of(rec)
        rows.add(row)
        columns[col] = min(columns.get(col, _column_key(rec)), _column_key(rec))
        value = rec["metrics"].get(metric)
        if value is not None:
            runs.setdefault((row, col), {})[(rec["run_id"], rec["scorer"])] = float(value)
    cells = {k: Cell(tuple(v.values())) for k, v in runs.items()}
    order = sorted(columns, key=lambda c: (columns[c], c))
    harmonic = _harmonic_columns(order, cells, rows) if metric in HARMONIC_METRICS else {}
    for hm, (_, new) in harmonic.items():
        order.insert(order.index(new) + 1, hm)
    return ResultsTable(metric, tuple(sorted(rows, key=_row_key)), tuple(order), cells, harmonic)


def _harmonic_columns(order, cells, rows) -> dict[str, tuple[str, str]]:
    """The [HM] column of every [base] column whose [new] twin is there, its cells added
    to ``cells`` (one value each: the harmonic mean of the pair's means)."""
    out = {}
    for base in order:
        if not base.endswith(_BASE) or base[: -len(_BASE)] + _NEW not in order:
            continue
        stem = base[: -len(_BASE)]
        new, hm = stem + _NEW, stem + _HM
        out[hm] = (base, new)
        for r in rows:
            if (r, base) in cells and (r, new) in cells:
                cells[(r, hm)] = Cell((harmonic_mean(cells[(r, base)].mean, cells[(r, new)].mean),))
    return out


def _number(table: ResultsTable, value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    scale = 100.0 if table.metric in _PERCENT else 1.0
    return f"{scale * value:.{digits}f}"


def _cell_text(table: ResultsTable, cell: Cell | None) -> str:
    if cell is None:
        return "-"
    text = _number(table, cell.mean, 2)
    return text if cell.std is None else f"{text} ± {_number(table, cell.std, 2)}"


def notes(table: ResultsTable) -> list[str]:
    """What the table's figures are, and each average that misses data sets."""
    unit = " (%)" if table.metric in _PERCENT else ""
    out = [f"{_TITLES.get(table.metric, table.metric)}{unit}; `-`: no result"]
    if any(c.std is not None for c in table.cells.values()):
        runs = sorted({len(c.values) for c in table.cells.values()})
        count = str(runs[0]) if len(runs) == 1 else f"{runs[0]} to {runs[-1]}"
        out.append(f"mean ± standard deviation over runs (seeds), {count} runs per cell")
    if table.harmonic:
        out.append(
            "[HM]: the harmonic mean 2BN / (B + N) of the [base] and [new] means per data set; "
            "its average is the harmonic mean of their averages over the data sets with both"
        )
    for col in table.columns:
        avg = table.average(col)
        if avg.missing:
            n = len(table.rows) - len(avg.missing)
            out.append(
                f"*{col}: average over {n} of {len(table.rows)} data sets "
                f"(missing: {', '.join(avg.missing)})"
            )
    return out


def to_markdown(table: ResultsTable) -> str:
    """A Markdown table (rows, then the average) and its notes below."""
    head = ["data set", *table.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * len(table.columns)]
    for row in table.rows:
        cells = [_cell_text(table, table.cells.get((row, c))) for c in table.columns]
        lines.append("| " + " | ".join([row, *cells]) + " |")
    avgs = []
    for col in table.columns:
        avg = table.average(col)
        avgs.append(
            _number(table, avg.value, 2) + ("*" if avg.missing and avg.value is not None else "")
        )
    lines.append("| " + " | ".join(["average", *avgs]) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes(table)) + "\n"


def to_csv(table: ResultsTable) -> str:
    """The same table as CSV (4 decimals; a missing cell empty); with several runs in
    some cell, a ``<column> std`` and ``<column> n`` column beside each column."""
    several = any(c.std is not None for c in table.cells.values())
    head = ["dataset"]
    for col in table.columns:
        head += [col, f"{col} std", f"{col} n"] if several else [col]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    for row in table.rows:
        out = [row]
        for col in table.columns:
            cell = table.cells.get((row, col))
            out.append("" if cell is None else _number(table, cell.mean, 4))
            if several:
                std = cell.std if cell is not None else None
                out += ["" if std is None else _number(table, std, 4)]
                derived = cell is None or col in table.harmonic
                out += ["" if derived else str(len(cell.values))]
        w.writerow(out)
    avg_row = ["average"]
    for col in table.columns:
        value = table.average(col).value
        avg_row.append("" if value is None else _number(table, value, 4))
        if several:
            avg_row += ["", ""]
    w.writerow(avg_row)
    return buf.getvalue()


def summary_record(table: ResultsTable, **extra) -> dict:
    """A JSON-ready summary of ``table`` (``format`` marks it for :func:`read_results`)."""
    cells = [
        {
            "dataset": r,
            "column": c,
            "values": list(table.cells[(r, c)].values),
            "mean": table.cells[(r, c)].mean,
            "std": table.cells[(r, c)].std,
        }
        for r in table.rows
        for c in table.columns
        if (r, c) in table.cells
    ]
    averages = {c: table.average(c) for c in table.columns}
    return {
        "format": SUMMARY_FORMAT,
        "metric": table.metric,
        "rows": list(table.rows),
        "columns": list(table.columns),
        "harmonic": {c: list(pair) for c, pair in table.harmonic.items()},
        "cells": cells,
        "averages": {
            c: {"value": a.value, "missing": list(a.missing)} for c, a in averages.items()
        },
        **extra,
    }


def write_table(table: ResultsTable, folder: Path, stem: str = "summary", **extra) -> list[Path]:
    """``<stem>.md``, ``<stem>.csv`` and ``<stem>.json`` in ``folder``."""
    from awt_engine._io import atomic_write_json, atomic_write_text

    folder = Path(folder)
    md, cs, js = (folder / f"{stem}{ext}" for ext in (".md", ".csv", ".json"))
    atomic_write_text(md, to_markdown(table))
    atomic_write_text(cs, to_csv(table))
    atomic_write_json(js, summary_record(table, **extra))
    return [md, cs, js]


__all__ = [
    "METRICS",
    "SUMMARY_FORMAT",
    "Average",
    "Cell",
    "NotAnEvalResult",
    "ReadResults",
    "ResultsTable",
    "column_of",
    "harmonic_mean",
    "notes",
    "read_results",
    "results_table",
    "summary_record",
    "to_csv",
    "to_markdown",
    "write_table",
]
