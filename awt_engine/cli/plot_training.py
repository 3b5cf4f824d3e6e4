"""`awt-engine plot-training`: a training run's JSONL log drawn as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from awt_engine.cli._app import app
from awt_engine.cli._common import fail, usage_errors


@app.command("plot-training")
@usage_errors
def plot_training(
    log: Annotated[
        Path,
        typer.Argument(
            help="The training log train writes beside its checkpoint (<output stem>.log.jsonl).",
            exists=True,
            dir_okay=False,
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="The PNG to write [default: the log's name with .png].",
            dir_okay=False,
        ),
    ] = None,
    title: Annotated[
        str | None, typer.Option(help="Title [default: method, epochs, images].")
    ] = None,
) -> None:
    """Draw a training log's loss terms, learning rate and held-out top-1 into a PNG
    (works on the log of a run still going, or one that stopped)."""
    if output is None:
        name = log.name.removesuffix(".jsonl").removesuffix(".log")
        output = log.with_name(name + ".png")
    if output.suffix.lower() != ".png":
        raise fail(f"--output {output}: the plot is a .png file")
    from awt_engine.training.plot import plot_training as draw
    from awt_engine.training.watch import read_log

    try:
        path = draw(read_log(log), output, title=title)
    except ImportError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"wrote {path}")


__all__ = ["plot_training"]
