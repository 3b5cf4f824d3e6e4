"""The typer application every command module registers on."""

import typer

app = typer.Typer(
    name="awt-engine",
    help="Training-free zero-shot image classification with VLMs (AWT).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts say "[default: ...]" and "{class: [...]}" literally
)
