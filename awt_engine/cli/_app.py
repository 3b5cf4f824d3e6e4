"""The typer application every command module registers on, and its global options."""

from __future__ import annotations

import warnings

import typer

app = typer.Typer(
    name="awt-engine",
    help="Zero-shot and few-shot image classification with vision-language models (AWT).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts say "[default: ...]" and "{class: [...]}" literally
)

_SHOWN: set[str] = set()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one ``warning: ...`` line on stderr, each text once per run."""
    text = str(message)
    if text in _SHOWN:
        return
    _SHOWN.add(text)
    typer.echo(f"warning: {text}", err=True)


def _version(value: bool) -> None:
    if value:
        from awt_engine import __version__

        typer.echo(f"awt-engine {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Zero-shot and few-shot image classification with vision-language models (AWT)."""


def show_warnings_plainly() -> None:
    """Warnings as ``warning: text`` lines, each once (called by the console entry point,
    so code that embeds the app, tests included, keeps Python's own handling)."""
    warnings.showwarning = _show_warning
