"""`awt-engine eval`: accuracy on a labelled data set, for one or more scorers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from awt_engine.cli._app import app
from awt_engine.cli._common import (
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
    UseRay,
    Views,
    ViewTemperature,
    Workers,
    awt_config,
    fail,
    parse_size,
    scorer_names,
    usage_errors,
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
            help="Repeatable: awt, clip, clip-descriptions, awt-uniform, awt-no-transport "
            "[default: awt].",
        ),
    ] = None,
    method: MethodAlias = None,
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

    Exit 0: every image was scored; 1: some images could not be read, or gave scores that
    are not finite numbers (named on stderr; the metrics cover the rest); 2: a usage error
    or results that cannot be written.
    """
    from awt_engine._io import resolve_cache_root
    from awt_engine.labelled import load_labelled, subset
    from awt_engine.registry import read_class_list
    from awt_engine.training.data import SUBSAMPLES, subsample_classes

    scorers = scorer_names(scorer, method)  # checked before anything heavy is imported
    use_ray = ray or ray_address is not None
    config = awt_config(eps, view_temperature, prompt_temperature, sinkhorn_tol, sinkhorn_iters)
    budget = parse_size(memory_budget) if memory_budget else None
    parts = ["base", "new"] if subsample == "base-new" else [subsample]
    if any(p not in SUBSAMPLES for p in parts):
        raise fail(f"--subsample must be all, base, new or base-new, got {subsample!r}")
    class_list = read_class_list(classes) if classes else None
    full = subset(
        load_labelled(
            data_root, dataset=dataset, classes=class_list, split=split, cache_dir=cache_dir
        ),
        limit,
        seed,
    )

    from awt_engine.classifier import create_classifier, load_model
    from awt_engine.evaluate import (
        evaluate,
        format_table,
        harmonic_means,
        result_records,
        write_results,
    )

    root = resolve_cache_root(cache_dir)
    net = load_model(
        model,
        weights_arg(pretrained, checkpoint),
        checkpoint=checkpoint,
        llm=llm,
        device=device,
        precision=precision,
    )
    from awt_engine.models.base import trained_info
    from awt_engine.models.factory import DEFAULT_MODEL

    info = trained_info(net)
    header = info.header if info is not None else None
    model_name = model or (header["backbone"]["model"] if header else DEFAULT_MODEL)
    results = {}
    failed = False
    for part in parts:
        data = subsample_classes(full, part)
        typer.echo(
            f"{data.name}: {len(data.items)} images, {len(data.classes)} classes ({data.source})",
            err=True,
        )
        same_as_trained = header is not None and tuple(header["labels"]["classes"]) == data.classes
        settings = dict(
            # a checkpoint's own label set (with its descriptions) when the classes are its own
            dataset=None if same_as_trained else dataset,
            classes=None if same_as_trained else list(data.classes),
            template=template,
            descriptions=descriptions,
            views=views,
            frames=frames,
            seed=seed,
            scorer=scorers[0],
            cache_dir=root,
            batch_size=batch_size,
            workers=workers,
            shortlist=shortlist,
            memory_budget=budget,
            awt_config=config,
        )
        clf = create_classifier(embedder=net, **settings, progress=progress)
        if use_ray:  # each actor loads the model as this process did
            from awt_engine import distributed

            distributed.init(ray_address)
            loading = dict(
                model=model,
                pretrained=weights_arg(pretrained, checkpoint),
                checkpoint=checkpoint,
                llm=llm,
                device=device,
                precision=precision,
            )
            result = distributed.evaluate_dataset(
                {**loading, **settings},
                data,
                scorers,
                concurrency=concurrency,
                num_gpus=num_gpus,
                progress=progress,
            )
        else:
            result = evaluate(
                clf, data, scorers, cache_root=root, image_cache=image_cache, progress=progress
            )
        results[part] = result
        for path, reason in result.failed:
            typer.echo(f"error: {path}: {reason}", err=True)
        if len(parts) > 1:
            typer.echo(f"{part} classes:")
        typer.echo(format_table(result))
        failed = failed or bool(result.failed)
        if output is not None:
            records = result_records(
                result,
                clf,
                model=model_name,
                data_root=data_root,
                split=split,
                limit=limit,
                subsample=part,
                checkpoint=str(checkpoint) if checkpoint else None,
            )
            for p in write_results(records, output):
                typer.echo(f"wrote {p}", err=True)
    if len(parts) > 1:
        for name, (b, n, hm) in harmonic_means(results["base"], results["new"]).items():
            show = "-" if hm is None else f"{100 * hm:.2f}%"
            typer.echo(f"{name}: base {100 * b:.2f}%, new {100 * n:.2f}%, harmonic mean {show}")
    if failed:
        raise typer.Exit(1)
