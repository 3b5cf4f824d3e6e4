"""Command line: a thin typer shell over the Python API.

Each command lives in its own module and registers itself on the shared ``app``.
"""

# Importing the modules registers their commands on ``app``.
from awt_engine.cli import cache as _cache  # noqa: F401
from awt_engine.cli import classify as _classify  # noqa: F401
from awt_engine.cli import describe as _describe  # noqa: F401
from awt_engine.cli import evaluate as _evaluate  # noqa: F401
from awt_engine.cli import experiments as _experiments  # noqa: F401
from awt_engine.cli import explain as _explain  # noqa: F401
from awt_engine.cli import export as _export  # noqa: F401
from awt_engine.cli import listing as _listing  # noqa: F401
from awt_engine.cli import plot_training as _plot_training  # noqa: F401
from awt_engine.cli import serve as _serve  # noqa: F401
from awt_engine.cli import train as _train  # noqa: F401
from awt_engine.cli._app import app, show_warnings_plainly


def main() -> None:
    show_warnings_plainly()
    app()


__all__ = ["app", "main"]
