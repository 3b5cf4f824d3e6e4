"""`awt-engine eval`: accuracy on a labelled data set, for one or more scorers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from awt_engine.cli._app import app
from awt_engine.cli._common import (
    Adapt,
    AdaptSet,
    BatchSize,
    CacheDir,
    Checkpoint,
    Classes,
    Concurrency,
    Descriptions,
    Device,
    Eps,
    Frames,
    Llm,
    MemoryBudget,
    MethodAlias,
    Model,
    NumGpus,
    Precision,
    Pretrained,
    Progress,
    PromptTemperature,
    RayAddress,
    Seed,
    Shortlist,
    SinkhornIters,
    SinkhornTol,
    Template,
    Threads,
    UseRay,
    Views,
    ViewTemperature,
    Workers,
    adapt_settings,
    awt_config,
    fail,
    parse_size,
    scorer_help,
    scorer_names,
    usage_errors,
    use_threads,
    weights_arg,
)
from awt_engine.eval_runs import EvalReporter


@app.command("eval")
@usage_errors
def eval_command(
    data_root: Annotated[
        Path,
        typer.Option(
            help="Labelled images: one folder per class, or a CoOp-style benchmark folder.",
            exists=True,
            file_okay=False,
        ),
    ],
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset",
            "-d",
            help="Registry data set (see `awt-engine datasets`: its layouts, classes, template "
            "and descriptions), or the name of a description cache (`cache import`, `describe "
            "--name`): then --data-root is one folder per class, matched to the cache's classes.",
        ),
    ] = None,
    scorer: Annotated[
        list[str] | None,
        typer.Option(
            "--scorer",
            "-s",
            help=scorer_help("Repeatable: "),
        ),
    ] = None,
    method: MethodAlias = None,
    adapt: Adapt = None,
    set_: AdaptSet = None,
    orders: Annotated[
        int,
        typer.Option(
            min=1,
            help="With an online --adapt (tda, dota): run it over K seeded random orders of "
            "the images and report each run, their mean and standard deviation (the model "
            "runs once).",
        ),
    ] = 1,
    order_seed: Annotated[
        int, typer.Option(help="Seed of the first order (run k uses this + k).")
    ] = 0,
    ood_root: Annotated[
        Path | None,
        typer.Option(
            help="Images of none of the classes (searched recursively): adds ood_auroc and "
            "ood_fpr95 by each scorer's maximum class probability (MCM).",
            exists=True,
            file_okay=False,
        ),
    ] = None,
    plots: Annotated[
        Path | None,
        typer.Option(
            help="Folder for a reliability diagram PNG per scorer.",
            file_okay=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Folder for one JSON per run and scorer (CLIP_benchmark's shape).",
            file_okay=False,
        ),
    ] = None,
    classes: Classes = None,
    template: Template = None,
    model: Model = None,
    checkpoint: Checkpoint = None,
    llm: Llm = None,
    pretrained: Pretrained = None,
    descriptions: Descriptions = None,
    views: Views = 51,
    frames: Frames = 8,
    seed: Seed = 0,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Evaluate a fixed-seed random subset of N images.")
    ] = None,
    split: Annotated[
        str, typer.Option(help="Split of CoOp-style split files: test, val or train.")
    ] = "test",
    subsample: Annotated[
        str,
        typer.Option(
            help="Classes: all, base or new (CoOp's base-to-new split), or base-new: both, "
            "with their harmonic mean."
        ),
    ] = "all",
    shortlist: Shortlist = None,
    memory_budget: MemoryBudget = None,
    device: Device = "auto",
    precision: Precision = None,
    threads: Threads = None,
    cache_dir: CacheDir = None,
    image_cache: Annotated[
        bool,
        typer.Option(
            "--image-cache/--no-image-cache",
            help="Keep view embeddings on disk (float16) so a rerun skips the encoder.",
        ),
    ] = True,
    batch_size: BatchSize = 4,
    workers: Workers = 2,
    eps: Eps = None,
    view_temperature: ViewTemperature = None,
    prompt_temperature: PromptTemperature = None,
    sinkhorn_tol: SinkhornTol = None,
    sinkhorn_iters: SinkhornIters = None,
    progress: Progress = True,
    ray: UseRay = False,
    ray_address: RayAddress = None,
    concurrency: Concurrency = None,
    num_gpus: NumGpus = None,
    suite: Annotated[
        str | None,
        typer.Option(
            help="Evaluate every data set of a suite found under --data-root (its folders "
            "as CoOp names them: dtd/, oxford_pets/, ...): coop11 (CoOp's and AWT's 11) or "
            "coop10 (without ImageNet); absent ones are named and skipped. Also writes "
            "summary.md / .csv / .json into --output.",
        ),
    ] = None,
) -> None:
    """Top-1, top-5 and mean per-class recall; every scorer from one pass of the model.

    With --ray the images are scored by a pool of Ray Data actors (no image cache) and
    the metrics and JSON are the local run's.

    With --adapt, each scorer is also reported adapted (awt+tda, ...): the model runs
    once, then the adaptation is replayed over --orders seeded orders of the images
    (tda, dota) or solved once over all of them (transclip). Calibration (ece,
    ece_adaptive, nll, brier, aurc) is in every JSON; test-time adaptation often worsens
    it, and the table shows it beside the accuracy.

    Exit 0: every image was scored; 1: some images could not be read, or gave scores that
    are not finite numbers (named on stderr; the metrics cover the rest); 2: a usage error
    or results that cannot be written.
    """
    scorers = scorer_names(scorer, method)  # checked before anything heavy is imported
    adapting = adapt_settings(adapt, set_)
    if orders > 1 and adapt is None:
        raise fail("--orders replays an online adaptation over seeded orders: give --adapt")
    config = awt_config(eps, view_temperature, prompt_temperature, sinkhorn_tol, sinkhorn_iters)
    budget = parse_size(memory_budget) if memory_budget else None
    if subsample not in ("all", "base", "new", "base-new"):
        raise fail(f"--subsample must be all, base, new or base-new, got {subsample!r}")
    from awt_engine import eval_runs

    if suite is None:
        data = eval_runs.load_eval_data(
            data_root,
            dataset=dataset,
            classes=classes,
            split=split,
            cache_dir=cache_dir,
            limit=limit,
            seed=seed,
        )
    else:  # the suite's data sets under --data-root, each read when its turn comes
        data = _suite_sets(suite, dataset, classes, data_root)
    ood = eval_runs.ood_images(ood_root, warn=_warn) if ood_root is not None else None

    from awt_engine._io import resolve_cache_root
    from awt_engine.dispatch import ModelSource, RayOptions

    use_threads(threads)
    root = resolve_cache_root(cache_dir)
    source = ModelSource(
        model, weights_arg(pretrained, checkpoint), checkpoint, llm, device, precision
    )
    options = dict(
        template=template,
        descriptions=descriptions,
        views=views,
        frames=frames,
        seed=seed,
        cache_dir=root,
        batch_size=batch_size,
        workers=workers,
        shortlist=shortlist,
        memory_budget=budget,
        awt_config=config,
    )
    use_ray = ray or ray_address is not None  # each actor loads the model as this process did
    plan = eval_runs.EvalPlan(
        scorers=tuple(scorers),
        **adapting,  # adapt and adapt_options, when given
        options=options,
        subsample=subsample,
        orders=orders,
        order_seed=order_seed,
        ood_root=ood_root,
        split=split,
        limit=limit,
        source=source,
        ray=RayOptions(ray_address, concurrency, num_gpus, threads) if use_ray else None,
        cache_root=root,
        image_cache=image_cache,
        progress=progress,
        output=output,
        plots=plots,
    )
    eval_runs.plan_scorers(plan)  # the adapted scorers are made before the model loads
    if suite is not None:
        _check_suite_labels(data, plan)
    net = source.load()
    report = _Report(several=subsample == "base-new")
    if suite is None:
        run = dict(dataset=dataset, data_root=data_root, model=model, ood=ood, reporter=report)
        done = eval_runs.run_eval(net, data, plan, **run)
    else:
        done = _run_suite(net, suite, data, plan, data_root, model, ood, report, cache_dir)
    if done.failed:
        raise typer.Exit(1)


def _warn(message: str) -> None:
    typer.echo(f"warning: {message}", err=True)


def _suite_sets(suite: str, dataset: str | None, classes: str | None, data_root: Path):
    """The data sets of --suite under --data-root; the absent ones named on stderr, none
    present a usage error, as are the options a suite replaces."""
    from awt_engine.eval_runs import find_suite, suite_names
    from awt_engine.layouts.catalog import files_for

    if dataset is not None:
        raise fail(
            "--suite evaluates each data set of the suite found under --data-root: drop --dataset"
        )
    if classes is not None:
        raise fail("--suite takes each data set's own classes: drop --classes")
    names = suite_names(suite)
    sets = find_suite(data_root, names)
    expected = ", ".join(
        f"{n} ({' or '.join(f + '/' for f in files_for(n).folders)})" for n in sets.absent
    )
    if not sets.present:
        raise fail(f"--suite {suite}: none of its data sets is under {data_root}: {expected}")
    if sets.absent:
        _warn(
            f"{suite}: {len(sets.absent)} of {len(names)} data sets not under {data_root}, skipped: {expected}"
        )
    return sets


def _check_suite_labels(sets, plan) -> None:
    """Every present data set's label set, before the model loads (a usage error naming
    each that cannot be made)."""
    from awt_engine.eval_runs import label_problems

    problems = label_problems(sets.present, plan)
    if problems:
        listed = "\n".join(f"{name}: {why}" for name, why in problems.items())
        raise fail(f"--suite: {len(problems)} data sets cannot be labelled:\n{listed}")


def _run_suite(net, suite, sets, plan, data_root, model, ood, report, cache_dir):
    """Each present data set evaluated, then the summary table (stdout; with --output
    also summary.md, summary.csv and summary.json there)."""
    from awt_engine import eval_runs
    from awt_engine.results_table import results_table, to_markdown, write_table

    done = eval_runs.evaluate_suite(
        net,
        sets,
        plan,
        cache_dir=cache_dir,
        seed=plan.options["seed"],
        model=model,
        ood=ood,
        reporter=report,
        skip=lambda name, why: typer.echo(f"error: {name}: {why}; skipped", err=True),
    )
    table = results_table(done.records)
    if not done.records:
        return done
    typer.echo(f"\n{suite} summary:\n")
    typer.echo(to_markdown(table), nl=False)
    if plan.output is not None:
        extra = dict(suite=suite, data_root=str(data_root), absent=list(sets.absent))
        extra["unreadable"] = done.unreadable
        report.wrote(write_table(table, plan.output, **extra))
    return done


class _Report(EvalReporter):
    """Prints each class subset's table (and its failures) and the files written."""

    def __init__(self, several: bool):
        self.several = several

    def before(self, part: str, data) -> None:
        typer.echo(
            f"{data.name}: {len(data.items)} images, {len(data.classes)} classes ({data.source})",
            err=True,
        )

    def after(self, run) -> None:
        from awt_engine.evaluate import format_table
        from awt_engine.evaluate_adapted import calibration_notes

        result = run.result
        for path, reason in result.failed:
            typer.echo(f"error: {path}: {reason}", err=True)
        if self.several:
            typer.echo(f"{run.part} classes:")
        typer.echo(format_table(result))
        for note in calibration_notes(result.metrics, result.scorers):
            typer.echo(f"note: {note}")

    def wrote(self, paths) -> None:
        for p in paths:
            typer.echo(f"wrote {p}", err=True)

    def harmonic(self, report: dict) -> None:
        for name, h in report.items():
            show = "-" if h.harmonic_mean is None else f"{100 * h.harmonic_mean:.2f}%"
            typer.echo(
                f"{name}: base {100 * h.base:.2f}%, new {100 * h.new:.2f}%, harmonic mean {show}"
            )
