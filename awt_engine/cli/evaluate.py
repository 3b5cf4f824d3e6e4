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
    full = _labelled(data_root, dataset, classes, split, cache_dir, limit, seed)
    ood = _ood_images(ood_root) if ood_root is not None else None
    if adapting:
        from awt_engine.adapt.scorer import adapted_scorer

        scorers = scorers + [
            adapted_scorer(n, adapting["adapt"], adapting["adapt_options"]) for n in scorers
        ]

    from awt_engine import protocols
    from awt_engine._io import resolve_cache_root
    from awt_engine.dispatch import ModelSource, RayOptions

    use_threads(threads)
    root = resolve_cache_root(cache_dir)
    source = ModelSource(
        model, weights_arg(pretrained, checkpoint), checkpoint, llm, device, precision
    )
    net = source.load()
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
    report = _Report(
        output=output,
        model=protocols.model_name(net, model),
        records=dict(data_root=data_root, split=split, limit=limit, checkpoint=checkpoint),
        several=subsample == "base-new",
        plots=plots,
    )
    run = dict(
        dataset=dataset,
        options=options,
        source=source,
        ray=RayOptions(ray_address, concurrency, num_gpus) if use_ray else None,
        cache_root=root,
        image_cache=image_cache,
        progress=progress,
        before=report.before,
        after=report.after,
        eval_options={
            "orders": orders,
            "order_seed": order_seed,
            "ood": ood,
            "ood_root": str(ood_root) if ood_root is not None else None,
        },
    )
    if subsample == "base-new":
        both = protocols.evaluate_base_to_new(net, full, scorers, **run)
        report.harmonic(both.harmonic)
    else:
        protocols.evaluate_subsamples(net, full, [subsample], scorers, **run)
    if report.failed:
        raise typer.Exit(1)


def _ood_images(root: Path) -> list:
    """The images under --ood-root; a usage error when there are none."""
    from awt_engine.inputs.files import find_images

    found = find_images([root])
    for folder in found.unreadable:
        typer.echo(f"warning: {folder.path}: {folder.reason}; skipped", err=True)
    if not found.images:
        raise fail(f"--ood-root {root}: no images found in it")
    return found.images


def _labelled(data_root, dataset, classes, split, cache_dir, limit, seed):
    """The labelled images (a fixed-seed subset of ``limit`` of them)."""
    from awt_engine.labelled import load_labelled, subset
    from awt_engine.registry import read_class_list

    class_list = read_class_list(classes) if classes else None
    data = load_labelled(
        data_root, dataset=dataset, classes=class_list, split=split, cache_dir=cache_dir
    )
    return subset(data, limit, seed)


class _Report:
    """Prints each class subset's table (and its failures), writes its JSON records."""

    def __init__(self, output: Path | None, model: str, records: dict, several: bool, plots=None):
        self.output, self.model, self.records, self.several = output, model, records, several
        self.plots = plots
        self.failed = False

    def before(self, part: str, data) -> None:
        typer.echo(
            f"{data.name}: {len(data.items)} images, {len(data.classes)} classes ({data.source})",
            err=True,
        )

    def after(self, run) -> None:
        from awt_engine.evaluate import format_table

        result = run.result
        for path, reason in result.failed:
            typer.echo(f"error: {path}: {reason}", err=True)
        if self.several:
            typer.echo(f"{run.part} classes:")
        typer.echo(format_table(result))
        from awt_engine.evaluate_adapted import calibration_notes

        for note in calibration_notes(result.metrics, result.scorers):
            typer.echo(f"note: {note}")
        self.failed = self.failed or bool(result.failed)
        if self.output is not None:
            self._write(run)
        if self.plots is not None:
            from awt_engine.reliability import write_reliability_plots

            for p in write_reliability_plots(run.result, self.plots, part=run.part):
                typer.echo(f"wrote {p}", err=True)

    def _write(self, run) -> None:
        from awt_engine.evaluate import result_records, write_results

        checkpoint = self.records["checkpoint"]
        records = result_records(
            run.result,
            run.classifier,
            model=self.model,
            data_root=self.records["data_root"],
            split=self.records["split"],
            limit=self.records["limit"],
            subsample=run.part,
            checkpoint=str(checkpoint) if checkpoint else None,
        )
        for p in write_results(records, self.output):
            typer.echo(f"wrote {p}", err=True)

    def harmonic(self, report: dict) -> None:
        for name, h in report.items():
            show = "-" if h.harmonic_mean is None else f"{100 * h.harmonic_mean:.2f}%"
            typer.echo(
                f"{name}: base {100 * h.base:.2f}%, new {100 * h.new:.2f}%, harmonic mean {show}"
            )
