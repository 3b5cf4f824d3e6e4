"""`awt-engine classify` and `awt-engine datasets`."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Annotated

import typer

from awt_engine.cli._app import app
from awt_engine.cli._common import (
    EXIT_OK,
    EXIT_PARTIAL,
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

OUTPUT_FORMATS = (".jsonl", ".csv")


@app.command()
@usage_errors
def classify(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Image files, folders (searched recursively) or globs.", show_default=False
        ),
    ],
    dataset: Dataset = None,
    classes: Classes = None,
    template: Template = None,
    model: Model = "ViT-B-16-quickgelu",
    pretrained: Pretrained = "openai",
    descriptions: Descriptions = None,
    views: Views = 51,
    seed: Seed = 0,
    method: Annotated[
        str, typer.Option(help="awt, clip, clip-descriptions, awt-uniform, awt-no-transport.")
    ] = "awt",
    device: Device = "auto",
    cache_dir: CacheDir = None,
    batch_size: BatchSize = 4,
    workers: Workers = 2,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Write predictions to a .jsonl or .csv file.", dir_okay=False
        ),
    ] = None,
    top_k: Annotated[int, typer.Option(min=1, help="Predictions kept per image in --output.")] = 5,
    shortlist: Shortlist = None,
    memory_budget: MemoryBudget = None,
    precision: Precision = None,
) -> None:
    """Classify images zero-shot; one line per image on stdout (path, label, score)."""
    from awt_engine.classifier import create_classifier
    from awt_engine.images import discover_images
    from awt_engine.scoring import list_methods

    if method not in list_methods():
        raise fail(f"unknown method {method!r}; choose one of: {', '.join(list_methods())}")
    if output is not None and output.suffix.lower() not in OUTPUT_FORMATS:
        raise fail(
            f"--output {output}: unknown format {output.suffix or '(none)'!r}; use a "
            f"file ending in {' or '.join(OUTPUT_FORMATS)}"
        )
    if classes is None and dataset is None:
        raise fail("say what the classes are: --dataset NAME or --classes LIST")
    paths = discover_images(inputs)
    clf = create_classifier(
        model,
        weights_arg(pretrained),
        dataset=dataset,
        classes=classes,
        template=template,
        descriptions=descriptions,
        views=views,
        seed=seed,
        method=method,
        device=device,
        cache_dir=cache_dir,
        batch_size=batch_size,
        workers=workers,
        precision=precision,
        shortlist=shortlist,
        memory_budget=parse_size(memory_budget) if memory_budget else None,
    )
    n_failed = 0
    with _Writer(output) as writer:
        for pred in clf.classify(paths, top_k=top_k, progress=True, total=len(paths)):
            writer.write(pred)
            if pred.ok:
                best = pred.predictions[0]
                typer.echo(f"{pred.path}\t{best['label']}\t{best['score']:.4f}")
            else:
                n_failed += 1
                typer.echo(f"error: {pred.path}: {pred.error}", err=True)
    if n_failed:
        typer.echo(f"{n_failed} of {len(paths)} image(s) could not be classified", err=True)
        raise typer.Exit(EXIT_PARTIAL)
    raise typer.Exit(EXIT_OK)


class _Writer:
    """Streams rows to the output file as they come, so an interrupted run keeps them."""

    def __init__(self, path: Path | None):
        self.path = path
        self.f = None

    def __enter__(self):
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.f = open(self.path, "w", encoding="utf-8", newline="")
            if self.path.suffix.lower() == ".csv":
                self.csv = csv.writer(self.f)
                self.csv.writerow(["path", "rank", "label", "score", "error"])
        return self

    def write(self, pred) -> None:
        if self.f is None:
            return
        if self.path.suffix.lower() == ".jsonl":
            row = (
                {"path": pred.path, "predictions": pred.predictions}
                if pred.ok
                else {"path": pred.path, "error": pred.error}
            )
            self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        elif pred.ok:
            for rank, p in enumerate(pred.predictions, start=1):
                self.csv.writerow([pred.path, rank, p["label"], f"{p['score']:.6g}", ""])
        else:
            self.csv.writerow([pred.path, "", "", "", pred.error])
        self.f.flush()

    def __exit__(self, *exc):
        if self.f is not None:
            self.f.close()


@app.command()
def datasets(
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="Cache root, to show which data sets have descriptions.", file_okay=False
        ),
    ] = None,
) -> None:
    """List the data sets the registry knows: classes, template, cached descriptions."""
    from awt_engine._io import resolve_cache_root
    from awt_engine.datasets import get_dataset, list_datasets
    from awt_engine.descriptions import descriptions_path

    root = resolve_cache_root(cache_dir)
    rows = [("name", "classes", "descriptions", "template")]
    for name in list_datasets():
        info = get_dataset(name)
        n = str(len(info.classes)) if info.classes is not None else "from data"
        cached = "cached" if descriptions_path(name, root).exists() else "-"
        rows.append((name, n, cached, info.template))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        typer.echo("  ".join(x.ljust(w) for x, w in zip(r[:3], widths, strict=True)) + "  " + r[3])


__all__ = ["classify", "datasets"]
