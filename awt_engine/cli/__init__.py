"""Command line: a thin typer shell over the Python API.

Each command lives in its own module and registers itself on the shared ``app``.
"""

from awt_engine.cli._app import app

# Importing the modules registers their commands on ``app``.
from awt_engine.cli import cache as _cache  # noqa: E402,F401
from awt_engine.cli import classify as _classify  # noqa: E402,F401
from awt_engine.cli import describe as _describe  # noqa: E402,F401


def main() -> None:
    app()


__all__ = ["app", "main"]
