"""An eval run as a Python call: what ``awt-engine eval`` does, and the suite over the
standard data sets found under one folder.

:func:`run_eval` scores one labelled set with a loaded model: the scorers asked for and
their adapted twins (``--adapt``), CoOp's class subsets (all, base, new, or base-new with
the harmonic mean, :mod:`awt_engine.protocols`), OOD images, here or on Ray
(:mod:`awt_engine.dispatch`); it makes the result records (DESIGN section 3.4), writes
them and the reliability plots when asked, and tells an :class:`EvalReporter` of each
step (the CLI prints from it). :func:`evaluate_suite` runs it over every data set of a
suite (:data:`SUITES`, the 11 of the CoOp and AWT papers) found under a root, naming
the absent ones; :mod:`awt_engine.results_table` makes their summary table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when a run starts: the CLI reads SUITES without torch
    from awt_engine import protocols
    from awt_engine.dispatch import ModelSource, RayOptions
    from awt_engine.labelled import LabelledData

# CoOp's 11 data sets (Zhou et al. 2022, Table 1; AWT's Table 2), registry names in the
# papers' column order; coop10 leaves ImageNet out (CoOp's cross-data-set targets).
COOP11 = (
    "imagenet",
    "caltech101",
    "oxford_pets",
    "stanford_cars",
    "oxford_flowers",
    "food101",
    "fgvc_aircraft",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
)
SUITES: dict[str, tuple[str, ...]] = {"coop11": COOP11, "coop10": COOP11[1:]}


@dataclass(frozen=True)
class EvalPlan:
    """Everything an eval run does apart from its data and its model."""

    scorers: tuple[str, ...] = ("awt",)
    adapt: str | None = None  # an adaptation (tda, dota, transclip): each scorer also adapted
    adapt_options: Mapping[str, Any] = field(default_factory=dict)
    # create_classifier's keywords other than the model and the labels (template,
    # descriptions, views, frames, seed, cache_dir, batch_size, workers, shortlist,
    # memory_budget, awt_config)
    options: Mapping[str, Any] = field(default_factory=dict)
    subsample: str = "all"  # all, base, new or base-new (both and their harmonic mean)
    orders: int = 1  # an online adaptation's seeded orders
    order_seed: int = 0
    ood_root: Path | None = None  # images of no class: ood_auroc, ood_fpr95
    split: str = "test"  # recorded in the results
    limit: int | None = None  # recorded in the results
    source: ModelSource | None = None  # what Ray's actors load; its checkpoint is recorded
    ray: RayOptions | None = None
    cache_root: Path | None = None
    image_cache: bool = True
    progress: bool = False
    output: Path | None = None  # folder for one JSON per (class subset, scorer)
    plots: Path | None = None  # folder for a reliability diagram per scorer


class EvalReporter:
    """What a caller hears of a run; every method does nothing here (the CLI prints)."""

    def before(self, part: str, data: LabelledData) -> None:
        """Class subset ``part`` of the data is about to be scored."""

    def after(self, run: protocols.SplitRun) -> None:
        """Class subset ``run.part`` was scored (its records not yet written)."""

    def wrote(self, paths: Sequence[Path]) -> None:
        """Files written (result JSONs, plots)."""

    def harmonic(self, report: Mapping[str, protocols.HarmonicMean]) -> None:
        """The base-to-new report (subsample base-new only)."""


@dataclass
class EvalOutcome:
    """One data set's eval: per class subset its run, the records (one per subset and
    scorer, DESIGN 3.4) and the files written."""

    runs: dict[str, protocols.SplitRun] = field(default_factory=dict)  # part -> run
    records: list[dict] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    harmonic: dict[str, protocols.HarmonicMean] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        """Whether some image could not be read or gave scores that are not finite."""
        return any(run.result.failed for run in self.runs.values())


def load_eval_data(
    data_root: str | Path,
    *,
    dataset: str | None = None,
    classes: str | Sequence[str] | None = None,
    split: str = "test",
    cache_dir: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> LabelledData:
    """The labelled images of ``split`` (a fixed-seed subset of ``limit`` of them);
    ``classes`` a list, or a class-list file / comma list as ``--classes`` takes."""
    from awt_engine.labelled import load_labelled, subset
    from awt_engine.registry import read_class_list

    class_list = read_class_list(classes) if isinstance(classes, str | Path) else classes
    data = load_labelled(
        data_root, dataset=dataset, classes=class_list, split=split, cache_dir=cache_dir
    )
    return subset(data, limit, seed)


def ood_images(root: Path, warn: Callable[[str], None] | None = None) -> list:
    """The images under ``root`` (recursively); ``warn`` hears of each unreadable folder.
    ValueError when there are none."""
    from awt_engine.inputs.files import find_images

    found = find_images([root])
    for folder in found.unreadable:
        if warn is not None:
            warn(f"{folder.path}: {folder.reason}; skipped")
    if not found.images:
        raise ValueError(f"--ood-root {root}: no images found in it")
    return found.images


def plan_scorers(plan: EvalPlan) -> list:
    """The scorers a run scores: the plan's, then (with ``adapt``) each one adapted."""
    scorers: list = list(plan.scorers)
    if plan.adapt is not None:
        from awt_engine.adapt.scorer import adapted_scorer

        scorers += [adapted_scorer(n, plan.adapt, dict(plan.adapt_options)) for n in scorers]
    return scorers


def run_eval(
    net,
    data: LabelledData,
    plan: EvalPlan,
    *,
    dataset: str | None = None,
    data_root: str | Path | None = None,
    model: str | None = None,
    ood: Sequence | None = None,
    reporter: EvalReporter | None = None,
) -> EvalOutcome:
    """``data`` scored by the loaded model ``net`` as ``plan`` says (module docstring).

    ``dataset`` names the registry entry whose template and descriptions label the
    classes; ``data_root`` and ``model`` (default: the checkpoint's backbone, else the
    default model) are recorded; ``ood``: the OOD images when the caller found them
    already (else the plan's ``ood_root`` is searched)."""
    from awt_engine import protocols

    if plan.subsample not in protocols.SUBSAMPLES:
        raise ValueError(f"subsample must be all, base, new or base-new, got {plan.subsample!r}")
    if plan.ood_root is not None and ood is None:
        ood = ood_images(plan.ood_root)
    tell = reporter or EvalReporter()
    out = EvalOutcome()
    name = protocols.model_name(net, model)
    checkpoint = plan.source.checkpoint if plan.source is not None else None

    def after(run: protocols.SplitRun) -> None:
        tell.after(run)
        out.runs[run.part] = run
        records = _records(run, name, data_root, plan, checkpoint)
        out.records += records.values()
        if plan.output is not None:
            from awt_engine.evaluate import write_results

            written = write_results(records, plan.output)
            out.paths += written
            tell.wrote(written)
        if plan.plots is not None:
            from awt_engine.reliability import write_reliability_plots

            tell.wrote(write_reliability_plots(run.result, plan.plots, part=run.part))

    run = dict(
        dataset=dataset,
        options=dict(plan.options),
        source=plan.source,
        ray=plan.ray,
        cache_root=plan.cache_root,
        image_cache=plan.image_cache,
        progress=plan.progress,
        before=tell.before,
        after=after,
        eval_options={
            "orders": plan.orders,
            "order_seed": plan.order_seed,
            "ood": ood,
            "ood_root": str(plan.ood_root) if plan.ood_root is not None else None,
        },
    )
    scorers = plan_scorers(plan)
    if plan.subsample == "base-new":
        out.harmonic = protocols.evaluate_base_to_new(net, data, scorers, **run).harmonic
        tell.harmonic(out.harmonic)
    else:
        protocols.evaluate_subsamples(net, data, [plan.subsample], scorers, **run)
    return out


def _records(run, model: str, data_root, plan: EvalPlan, checkpoint) -> dict[str, dict]:
    from awt_engine.evaluate import result_records

    return result_records(
        run.result,
        run.classifier,
        model=model,
        data_root=data_root if data_root is not None else "",
        split=plan.split,
        limit=plan.limit,
        subsample=run.part,
        checkpoint=str(checkpoint) if checkpoint else None,
    )


# --------------------------------------------------------------------------- suites


@dataclass(frozen=True)
class SuiteSets:
    """Where each data set of a suite is under a root, and which are not there."""

    present: dict[str, Path]  # registry name -> its folder, in the suite's order
    absent: tuple[str, ...]


def suite_names(suite: str) -> tuple[str, ...]:
    """The registry names of ``suite``; ValueError listing the suites."""
    try:
        return SUITES[suite.lower()]
    except KeyError:
        raise ValueError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}") from None


def find_suite(root: str | Path, names: Sequence[str]) -> SuiteSets:
    """Each data set of ``names`` whose folder (its catalog folder names, CoOp's:
    ``dtd/``, ``oxford_pets/``, ``eurosat/`` or ``EuroSAT/``, ...) is under ``root``."""
    from awt_engine.layouts.catalog import files_for

    root = Path(root).expanduser()
    present, absent = {}, []
    for name in names:
        folder = next((root / f for f in files_for(name).folders if (root / f).is_dir()), None)
        if folder is None:
            absent.append(name)
        else:
            present[name] = folder
    return SuiteSets(present, tuple(absent))


def label_problems(names: Iterable[str], plan: EvalPlan) -> dict[str, str]:
    """Per registry data set of ``names`` whose label set cannot be made with the plan's
    template and descriptions (no description cache, a bad template, ...), why: checked
    for a whole suite before any model loads, so a long run does not stop at its fifth
    data set."""
    from awt_engine.labels import resolve_label_set

    problems = {}
    opts = plan.options
    for name in names:
        try:
            resolve_label_set(
                name, None, opts.get("template"), opts.get("descriptions"), opts.get("cache_dir")
            )
        except ValueError as exc:
            problems[name] = str(exc)
    return problems


@dataclass
class SuiteOutcome:
    """A suite's evals: per present data set its outcome; the absent ones; the present
    ones that could not be read (name -> why)."""

    outcomes: dict[str, EvalOutcome] = field(default_factory=dict)
    absent: tuple[str, ...] = ()
    unreadable: dict[str, str] = field(default_factory=dict)

    @property
    def records(self) -> list[dict]:
        return [r for o in self.outcomes.values() for r in o.records]

    @property
    def failed(self) -> bool:
        return bool(self.unreadable) or any(o.failed for o in self.outcomes.values())


def evaluate_suite(
    net,
    sets: SuiteSets,
    plan: EvalPlan,
    *,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    model: str | None = None,
    ood: Sequence | None = None,
    reporter: EvalReporter | None = None,
    skip: Callable[[str, str], None] | None = None,
) -> SuiteOutcome:
    """:func:`run_eval` of ``net`` on each present data set of ``sets``
    (:func:`find_suite`), in order, with its own classes, template and descriptions. A
    present one whose files cannot be read is left out and ``skip(name, why)`` told.
    ``seed`` draws the plan's ``limit`` subset, as ``eval --seed`` does."""
    from awt_engine.layouts import DatasetLayoutError

    out = SuiteOutcome(absent=sets.absent)
    for name, folder in sets.present.items():
        try:
            data = load_eval_data(
                folder,
                dataset=name,
                split=plan.split,
                cache_dir=cache_dir,
                limit=plan.limit,
                seed=seed,
            )
        except (DatasetLayoutError, ValueError) as exc:
            out.unreadable[name] = str(exc)
            if skip is not None:
                skip(name, str(exc))
            continue
        out.outcomes[name] = run_eval(
            net,
            data,
            plan,
            dataset=name,
            data_root=folder,
            model=model,
            ood=ood,
            reporter=reporter,
        )
    return out


__all__ = [
    "COOP11",
    "SUITES",
    "EvalOutcome",
    "EvalPlan",
    "EvalReporter",
    "SuiteOutcome",
    "SuiteSets",
    "evaluate_suite",
    "find_suite",
    "label_problems",
    "load_eval_data",
    "ood_images",
    "plan_scorers",
    "run_eval",
    "suite_names",
]
