"""The training protocols as Python calls: CoOp's few-shot protocol and its cross-data-set
transfer.

:func:`few_shot` trains a method for each shot count K and seed (CoOp's ``main.sh`` over
``SHOTS`` and seeds 1-3), evaluates each checkpoint on the test split
(:func:`~awt_engine.eval_runs.run_eval`), optionally on other data sets too (CoOp's
``xd_train.sh`` / ``xd_test.sh``: the transfer targets), and summarises the runs per (data
set, K, scorer) by their mean and standard deviation over the seeds (CoOp's
``parse_test_res.py``; :mod:`awt_engine.results_table`). With ``subsample`` base, new or
base-new it is CoOp's base-to-new protocol: each checkpoint learns the base classes and
is evaluated on the halves asked for.

Files under ``output``: ``checkpoints/<method>-<K>shot-seed<S>.safetensors``, the eval
JSONs of each run in ``<K>shot/seed<S>/`` (one per data set, class subset and scorer, as
``eval -o`` writes) and ``summary.md`` / ``summary.csv`` / ``summary.json``. A checkpoint
already there whose header says the same method, shots, seed and classes is reused
rather than trained again (CoOp's scripts skip a finished run the same way), so an
interrupted protocol resumes; one that says otherwise is an error naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from awt_engine.eval_runs import EvalOutcome, EvalPlan, EvalReporter, load_eval_data, run_eval
from awt_engine.results_table import ResultsTable, results_table, write_table

DEFAULT_SHOTS = (1, 2, 4, 8, 16)  # CoOp's Figure 3
DEFAULT_SEEDS = (1, 2, 3)  # CoOp's scripts: seeds 1, 2 and 3


class ProtocolReporter(EvalReporter):
    """An :class:`~awt_engine.eval_runs.EvalReporter` that also hears of the training."""

    def training(self, shots: int, seed: int, checkpoint: Path, reused: bool) -> None:
        """Run (shots, seed) is about to train ``checkpoint`` (``reused``: it exists)."""

    def evaluating(self, dataset: str, checkpoint: Path) -> None:
        """``checkpoint`` is about to be evaluated on ``dataset`` (its data read)."""


@dataclass
class ProtocolRun:
    """One trained checkpoint and its evals, per data set (the training set first)."""

    shots: int
    seed: int
    checkpoint: Path
    reused: bool
    outcomes: dict[str, EvalOutcome] = field(default_factory=dict)


@dataclass
class ProtocolOutcome:
    runs: list[ProtocolRun]
    table: ResultsTable  # mean +- std over the seeds per (data set, K and scorer)
    summary: list[Path]  # summary.md, .csv, .json

    @property
    def records(self) -> list[dict]:
        return [r for run in self.runs for o in run.outcomes.values() for r in o.records]

    @property
    def failed(self) -> bool:
        return any(o.failed for run in self.runs for o in run.outcomes.values())


def few_shot(
    method: str,
    *,
    data_root: str | Path,
    output: str | Path,
    dataset: str | None = None,
    classes: str | Sequence[str] | None = None,
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    plan: EvalPlan | None = None,
    train_options: Mapping[str, Any] | None = None,
    targets: Mapping[str, str | Path] | None = None,
    evaluate_source: bool = True,
    reporter: ProtocolReporter | None = None,
) -> ProtocolOutcome:
    """CoOp's few-shot protocol (module docstring) for ``method`` on ``data_root``.

    ``plan``: how each checkpoint is evaluated (scorers, views, subsample, ...; its
    ``output`` and ``source`` are set per run); ``train_options``: the keywords of
    :func:`awt_engine.training.train` other than the data, shots, seed and output (model,
    pretrained, device, precision, template, descriptions, options, epochs, lr,
    batch_size, cache_dir, workers, ...). ``targets``: data set name -> folder, each
    checkpoint also evaluated there on all its classes (cross-data-set transfer);
    ``evaluate_source=False`` evaluates on the targets alone."""
    _check_counts(shots, seeds)
    plan = plan or EvalPlan()
    topts = dict(train_options or {})
    tell = reporter or ProtocolReporter()
    output = Path(output)
    part = "all" if plan.subsample == "all" else "base"  # base-to-new: learn the base half
    sets = _eval_sets(data_root, dataset, classes, evaluate_source, targets)
    _check_targets(sets, plan)
    runs = []
    for k in shots:
        for s in seeds:
            ckpt = output / "checkpoints" / f"{method}-{k}shot-seed{s}.safetensors"
            reused = _reusable(ckpt, method, k, s, part)
            tell.training(k, s, ckpt, reused)
            if not reused:
                _train(method, data_root, dataset, classes, k, s, part, ckpt, topts)
            run = ProtocolRun(k, s, ckpt, reused)
            where = Path(f"{k}shot", f"seed{s}")
            run.outcomes = _evaluate(ckpt, sets, plan, topts, output, where, tell)
            runs.append(run)
    table = results_table([r for run in runs for o in run.outcomes.values() for r in o.records])
    summary = write_table(
        table,
        output,
        protocol="few-shot",
        method=method,
        shots=list(shots),
        seeds=list(seeds),
        checkpoints=[str(r.checkpoint) for r in runs],
    )
    return ProtocolOutcome(runs, table, summary)


def cross_dataset(
    method: str,
    *,
    data_root: str | Path,
    targets: Mapping[str, str | Path],
    output: str | Path,
    shots: Sequence[int] = (16,),
    seeds: Sequence[int] = DEFAULT_SEEDS,
    **kwargs,
) -> ProtocolOutcome:
    """CoOp's cross-data-set transfer: train on ``data_root`` (16 shots, seeds 1-3, as
    CoOp trains on ImageNet) and evaluate each checkpoint on its own test split and on
    every target's (:func:`few_shot`'s other keywords)."""
    if not targets:
        raise ValueError("cross-data-set transfer needs at least one target data set")
    return few_shot(
        method,
        data_root=data_root,
        targets=targets,
        output=output,
        shots=shots,
        seeds=seeds,
        **kwargs,
    )


def _check_counts(shots: Sequence[int], seeds: Sequence[int]) -> None:
    if not shots or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in shots):
        raise ValueError(f"shots must be whole numbers >= 1, got {list(shots)}")
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds must be whole numbers, got {list(seeds)}")
    for what, values in (("shots", shots), ("seeds", seeds)):
        if len(set(values)) != len(values):
            raise ValueError(f"{what} repeat a value: {list(values)}")


@dataclass(frozen=True)
class _EvalSet:
    name: str | None  # a target's name; None for the training data (its own name)
    root: Path
    dataset: str | None  # the registry name it is read as, if any
    classes: Any = None


def _eval_sets(data_root, dataset, classes, evaluate_source, targets) -> list[_EvalSet]:
    """Every data set a checkpoint is evaluated on, the training one first. A target
    named by the registry is read as that data set (its layouts, classes, template); any
    other is a folder of class folders, its results named as given."""
    from awt_engine.registry import list_datasets

    known = set(list_datasets())
    sets = [_EvalSet(None, Path(data_root), dataset, classes)] if evaluate_source else []
    for name, root in (targets or {}).items():
        if dataset is not None and name == dataset and evaluate_source:
            raise ValueError(f"target {name!r} is the training data set (evaluated anyway)")
        sets.append(_EvalSet(name, Path(root), name if name in known else None))
    if not sets:
        raise ValueError("nothing to evaluate: no targets and evaluate_source=False")
    return sets


def _check_targets(sets: list[_EvalSet], plan: EvalPlan) -> None:
    """Every registry target's label set, before the first training (ValueError naming
    each that cannot be made, e.g. without its description cache)."""
    from awt_engine.eval_runs import label_problems

    names = [s.dataset for s in sets if s.name is not None and s.dataset is not None]
    problems = label_problems(names, plan)
    if problems:
        listed = "\n".join(f"{name}: {why}" for name, why in problems.items())
        raise ValueError(f"{len(problems)} transfer targets cannot be labelled:\n{listed}")


def _reusable(ckpt: Path, method: str, shots: int, seed: int, part: str) -> bool:
    """Whether ``ckpt`` exists as this run's checkpoint (ValueError if it is another's)."""
    if not ckpt.exists():
        return False
    from awt_engine.checkpoints import read_checkpoint_header

    header = read_checkpoint_header(ckpt)
    want = {"method": method, "shots": shots, "seed": seed, "subsample": part}
    have = {k: header.get(k) for k in want}
    if have != want:
        raise ValueError(
            f"{ckpt} exists but is another run's checkpoint ({have}, this run: {want}); "
            "move it away or write to another output folder"
        )
    return True


def _train(method, data_root, dataset, classes, shots, seed, part, ckpt, topts) -> None:
    from awt_engine.training import train

    train(
        method,
        data_root=data_root,
        output=ckpt,
        dataset=dataset,
        classes=classes,
        shots=shots,
        seed=seed,
        subsample=part,
        **topts,
    )


def _evaluate(ckpt, sets, plan: EvalPlan, topts, output: Path, where: Path, tell):
    """The checkpoint evaluated on each set (name -> outcome), its JSONs in
    ``output / where`` (its plots, if asked for, in ``plan.plots / where``)."""
    from awt_engine.dispatch import ModelSource

    source = ModelSource(
        checkpoint=ckpt,
        device=topts.get("device", "auto"),
        precision=topts.get("precision"),
    )
    run_plan = dataclasses.replace(
        plan,
        source=source,
        output=output / where,
        plots=None if plan.plots is None else plan.plots / where,
    )
    net = source.load()
    outcomes = {}
    for one in sets:
        data = load_eval_data(
            one.root,
            dataset=one.dataset,
            classes=one.classes,
            split=plan.split,
            cache_dir=topts.get("cache_dir"),
            limit=plan.limit,
            seed=plan.options.get("seed", 0),
        )
        target_plan = run_plan
        if one.name is not None:  # a transfer target: all its classes, named as given
            data = dataclasses.replace(data, name=one.name)
            target_plan = dataclasses.replace(run_plan, subsample="all")
        tell.evaluating(data.name, ckpt)
        outcomes[data.name] = run_eval(
            net, data, target_plan, dataset=one.dataset, data_root=one.root, reporter=tell
        )
    return outcomes


__all__ = [
    "DEFAULT_SEEDS",
    "DEFAULT_SHOTS",
    "ProtocolOutcome",
    "ProtocolReporter",
    "ProtocolRun",
    "cross_dataset",
    "few_shot",
]
