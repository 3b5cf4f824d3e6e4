"""`awt-engine fewshot` (CoOp's few-shot protocol, and its cross-data-set transfer) and
`awt-engine results` (eval JSONs of several folders in one table)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from awt_engine.cli._app import app
from awt_engine.cli._common import (
    CacheDir,
    Classes,
    Dataset,
    Descriptions,
    Device,
    Epochs,
    Frames,
    Llm,
    Lr,
    Precision,
    Progress,
    SetOptions,
    Template,
    TrainBatchSize,
    TrainModel,
    TrainPretrained,
    Views,
    Workers,
    fail,
    scorer_help,
    scorer_names,
    set_options,
    usage_errors,
    weights_arg,
)
from awt_engine.experiments import ProtocolReporter


def _ints(text: str, what: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); a usage error naming the option otherwise."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise fail(f"--{what} {text!r}: expected whole numbers separated by commas") from None
    if not values:
        raise fail(f"--{what} {text!r}: give at least one number")
    return values


@app.command()
@usage_errors
def fewshot(
    method: Annotated[
        str, typer.Option("--method", "-m", help="What to train (`awt-engine methods`).")
    ],
    data_root: Annotated[
        Path,
        typer.Option(
            help="Labelled images (any layout eval reads): trained on its train split, "
            "evaluated on its test split.",
            exists=True,
            file_okay=False,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Folder: checkpoints/, <K>shot/seed<S>/ eval JSONs, summary.md/.csv/.json.",
            file_okay=False,
        ),
    ],
    shots: Annotated[
        str, typer.Option(help="Shot counts K, comma-separated (CoOp's: 1,2,4,8,16).")
    ] = "1,2,4,8,16",
    seeds: Annotated[
        str, typer.Option(help="Training seeds, comma-separated (CoOp's scripts: 1,2,3).")
    ] = "1,2,3",
    dataset: Dataset = None,
    classes: Classes = None,
    template: Template = None,
    descriptions: Descriptions = None,
    scorer: Annotated[
        list[str] | None,
        typer.Option("--scorer", "-s", help=scorer_help("Evaluation scorers, repeatable: ")),
    ] = None,
    subsample: Annotated[
        str,
        typer.Option(
            help="all; or CoOp's base-to-new: train on the base classes, evaluate base, "
            "new or base-new (both, with their harmonic mean)."
        ),
    ] = "all",
    transfer: Annotated[
        Path | None,
        typer.Option(
            help="Cross-data-set transfer: also evaluate each checkpoint on every data set "
            "of --transfer-suite found under this folder (the training set left out).",
            exists=True,
            file_okay=False,
        ),
    ] = None,
    transfer_suite: Annotated[
        str, typer.Option(help="The data sets --transfer looks for: coop11 or coop10.")
    ] = "coop11",
    model: TrainModel = None,
    pretrained: TrainPretrained = "openai",
    epochs: Epochs = None,
    lr: Lr = None,
    batch_size: TrainBatchSize = None,
    set_: SetOptions = None,
    llm: Llm = None,
    views: Views = 51,
    frames: Frames = 8,
    eval_batch_size: Annotated[int, typer.Option(min=1, help="Images per evaluation batch.")] = 4,
    device: Device = "auto",
    precision: Precision = None,
    cache_dir: CacheDir = None,
    workers: Workers = 2,
    progress: Progress = True,
) -> None:
    """CoOp's few-shot protocol: train --method for each of --shots x --seeds, evaluate
    each checkpoint on the test split, and report mean and standard deviation over the
    seeds per shot count and scorer (summary.md). A checkpoint already in --output for
    the same run is reused, so an interrupted protocol resumes.

    Exit 0: every image was scored; 1: some images failed (named on stderr); 2: a usage
    error."""
    from awt_engine.methods import get_method

    get_method(method)  # an unknown name is answered before anything heavy is imported
    scorers = scorer_names(scorer, None)
    shot_counts, seed_list = _ints(shots, "shots"), _ints(seeds, "seeds")
    if subsample not in ("all", "base", "new", "base-new"):
        raise fail(f"--subsample must be all, base, new or base-new, got {subsample!r}")
    options = set_options(set_)
    if llm is not None:
        options.setdefault("llm", llm)
    targets = _targets(transfer, transfer_suite, dataset) if transfer is not None else {}

    from awt_engine import experiments
    from awt_engine._io import resolve_cache_root
    from awt_engine.eval_runs import EvalPlan

    plan = EvalPlan(
        scorers=tuple(scorers),
        options=dict(
            template=template,
            descriptions=descriptions,
            views=views,
            frames=frames,
            cache_dir=resolve_cache_root(cache_dir),
            batch_size=eval_batch_size,
            workers=workers,
        ),
        subsample=subsample,
        cache_root=resolve_cache_root(cache_dir),
        progress=progress,
    )
    train_options = dict(
        template=template,
        descriptions=descriptions,
        model=model,
        pretrained=weights_arg(pretrained),
        device=device,
        precision=precision,
        cache_dir=cache_dir,
        workers=workers,
        progress=progress,
        options=options,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
    )
    report = _ProtocolReport(several=subsample == "base-new")
    done = experiments.few_shot(
        method,
        data_root=data_root,
        output=output,
        dataset=dataset,
        classes=classes,
        shots=shot_counts,
        seeds=seed_list,
        plan=plan,
        train_options=train_options,
        targets=targets,
        reporter=report,
    )
    from awt_engine.results_table import to_markdown

    typer.echo(f"\n{method} few-shot summary:\n")
    typer.echo(to_markdown(done.table), nl=False)
    report.wrote(done.summary)
    if done.failed:
        raise typer.Exit(1)


def _targets(root: Path, suite: str, dataset: str | None) -> dict[str, Path]:
    """The transfer targets under ``root``: the suite's data sets there, the training
    one left out; the absent named on stderr, none a usage error."""
    from awt_engine.eval_runs import find_suite, suite_names

    names = [n for n in suite_names(suite) if n != dataset]
    sets = find_suite(root, names)
    if not sets.present:
        raise fail(f"--transfer {root}: no data set of {suite} is in it ({', '.join(names)})")
    if sets.absent:
        typer.echo(
            f"warning: {suite}: not under {root}, not transferred to: {', '.join(sets.absent)}",
            err=True,
        )
    return dict(sets.present)


class _ProtocolReport(ProtocolReporter):
    """Prints each run's training and eval tables (eval's), and the files written."""

    def __init__(self, several: bool):
        from awt_engine.cli.evaluate import _Report

        self.eval = _Report(several)

    def training(self, shots: int, seed: int, checkpoint: Path, reused: bool) -> None:
        verb = "reusing" if reused else "training"
        typer.echo(f"{shots} shots, seed {seed}: {verb} {checkpoint}", err=True)

    def evaluating(self, dataset: str, checkpoint: Path) -> None:
        typer.echo(f"{checkpoint.name} on {dataset}:")

    def before(self, part, data) -> None:
        self.eval.before(part, data)

    def after(self, run) -> None:
        self.eval.after(run)

    def wrote(self, paths) -> None:
        self.eval.wrote(paths)

    def harmonic(self, report) -> None:
        self.eval.harmonic(report)


@app.command()
@usage_errors
def results(
    folders: Annotated[
        list[Path],
        typer.Argument(help="Folders of eval JSONs (searched recursively) or JSON files."),
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the Markdown table here.", dir_okay=False),
    ] = None,
    csv: Annotated[
        Path | None, typer.Option("--csv", help="Write the table as CSV here.", dir_okay=False)
    ] = None,
    metric: Annotated[
        str,
        typer.Option(
            help="acc1, acc5, mean_per_class_recall, ece, ece_adaptive, nll, brier, aurc, "
            "ood_auroc or ood_fpr95."
        ),
    ] = "acc1",
) -> None:
    """Eval results of several runs in one table: a row per data set, a column per
    (model or trained method, scorer), the average over data sets below (a missing cell
    is `-`, left out of its average with a note). Several runs in one cell (seeds) show
    their mean and standard deviation. Printed as Markdown; -o / --csv write files.

    Exit 2 names a file that is not an eval result."""
    from awt_engine._io import atomic_write_text
    from awt_engine.results_table import read_results, results_table, to_csv, to_markdown

    found = read_results(folders)
    if not found.records:
        raise fail(f"no eval results in {', '.join(map(str, folders))}")
    table = results_table(found.records, metric)
    markdown = to_markdown(table)
    typer.echo(markdown, nl=False)
    typer.echo(
        f"{len(found.records)} results from {len(set(found.sources))} files"
        + (f"; {len(found.summaries)} summary files passed over" if found.summaries else ""),
        err=True,
    )
    for path, text in ((output, markdown), (csv, to_csv(table) if csv else "")):
        if path is not None:
            atomic_write_text(path, text)
            typer.echo(f"wrote {path}", err=True)


__all__ = ["fewshot", "results"]
