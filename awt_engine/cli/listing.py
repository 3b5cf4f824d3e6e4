"""`awt-engine datasets` and `awt-engine scorers`: what the engine knows, one line each."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from awt_engine.cli._app import app


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
    from awt_engine.descriptions import descriptions_path
    from awt_engine.registry import get_dataset, list_datasets

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


@app.command()
def scorers(
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Also the adaptations' options and defaults."),
    ] = False,
) -> None:
    """List the scorers (how embeddings or logits become class scores) and the
    adaptations that go on top of any of them (--adapt)."""
    from awt_engine.scorers import SCORERS

    width = max(len(n) for n in SCORERS)
    for name, s in SCORERS.items():
        needs = [
            w for w, on in (("views", s.uses_views), ("descriptions", s.uses_descriptions)) if on
        ]
        typer.echo(
            f"{name.ljust(width)}  {s.summary} (uses: {', '.join(needs) or 'view 0, prompt 0'})"
        )
    _adaptations(verbose)


def _adaptations(verbose: bool) -> None:
    """The --adapt choices, one line each; with ``verbose`` each option's default and help."""
    import dataclasses

    from awt_engine.adapt import ADAPTATIONS

    typer.echo("\nadaptations (--adapt, on top of any scorer; options: --set NAME=VALUE):")
    width = max(len(n) for n in ADAPTATIONS)
    for name, a in ADAPTATIONS.items():
        kind = "online" if a.online else "transductive"
        typer.echo(f"{name.ljust(width)}  {a.summary} ({kind}; {a.paper})")
        if not verbose:
            continue
        helps, config = a.options(), a.default_config()
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            typer.echo(
                f"{'':{width}}    --set {f.name}={value!r}  {helps.get(f.name, '')}".rstrip()
            )


__all__ = ["datasets", "scorers"]
