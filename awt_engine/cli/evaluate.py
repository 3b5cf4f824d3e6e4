"""`awt-engine eval`: accuracy on a labelled data set, for one or more methods."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from awt_engine.cli._app import app
from awt_engine.cli._common import (
    BatchSize,
    CacheDir,
    Classes,
    Dataset,
    Descriptions,
    Device,
    MemoryBudget,
    Model,
    Precision,
    Pretrained,
    Seed,
    Shortlist,
    Template,
    Views,
    Workers,
    fail,
    parse_size,
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
    dataset: Dataset = None,
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            "-m",
            help="Repeatable: awt, clip, clip-descriptions, awt-uniform, awt-no-transport [default: awt].",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Folder for one JSON per (data set, model, weights, method).",
            file_okay=False,
        ),
    ] = None,
    classes: Classes = None,
    template: Template = None,
    model: Model = "ViT-B-16-quickgelu",
    pretrained: Pretrained = "openai",
    descriptions: Descriptions = None,
    views: Views = 51,
    seed: Seed = 0,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Evaluate a fixed-seed random subset of N images.")
    ] = None,
    split: Annotated[
        str, typer.Option(help="Split of CoOp-style split files: test, val or train.")
    ] = "test",
    shortlist: Shortlist = None,
    memory_budget: MemoryBudget = None,
    device: Device = "auto",
    precision: Precision = None,
    cache_dir: CacheDir = None,
    batch_size: BatchSize = 4,
    workers: Workers = 2,
) -> None:
    """Top-1, top-5 and mean per-class recall; every method from the same embeddings."""
    from awt_engine._io import resolve_cache_root
    from awt_engine.classifier import create_classifier
    from awt_engine.datasets import read_class_list
    from awt_engine.evaluate import evaluate, format_table, result_records, write_results
    from awt_engine.labelled import load_labelled, subset
    from awt_engine.scoring import list_methods

    methods = list(dict.fromkeys(method or ["awt"]))
    bad = [m for m in methods if m not in list_methods()]
    if bad:
        raise fail(
            f"unknown method(s) {', '.join(map(repr, bad))}; choose from: {', '.join(list_methods())}"
        )
    class_list = read_class_list(classes) if classes else None
    data = subset(
        load_labelled(data_root, dataset=dataset, classes=class_list, split=split), limit, seed
    )
    typer.echo(
        f"{data.name}: {len(data.items)} images, {len(data.classes)} classes ({data.source})",
        err=True,
    )
    widest = (
        "awt"
        if any(m not in ("clip", "clip-descriptions") for m in methods)
        else "clip-descriptions"
    )
    root = resolve_cache_root(cache_dir)
    clf = create_classifier(
        model,
        weights_arg(pretrained),
        dataset=dataset,
        classes=list(data.classes),
        template=template,
        descriptions=descriptions,
        views=views,
        seed=seed,
        method=widest,
        device=device,
        cache_dir=root,
        batch_size=batch_size,
        workers=workers,
        precision=precision,
        shortlist=shortlist,
        memory_budget=parse_size(memory_budget) if memory_budget else None,
    )
    result = evaluate(clf, data, methods, cache_root=root, progress=True)
    for path, reason in result.failed:
        typer.echo(f"error: {path}: {reason}", err=True)
    typer.echo(format_table(result))
    if output is not None:
        n_desc = len(clf.labels.prompts[0]) - 1
        records = result_records(
            result,
            model=model,
            pretrained=str(getattr(clf.model, "weights", None) or pretrained),
            views=clf.view_config.n_views,
            descriptions=n_desc,
            seed=seed,
            limit=limit,
            shortlist=shortlist,
            split=split,
        )
        for p in write_results(records, output):
            typer.echo(f"wrote {p}", err=True)
    if result.failed:
        raise typer.Exit(1)
