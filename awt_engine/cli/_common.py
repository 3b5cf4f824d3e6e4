"""Helpers shared by the command modules: error reporting and exit codes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps

import typer

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print ``message`` to stderr and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def usage_errors(fn: Callable) -> Callable:
    """Turn ValueError (bad user input: unknown data set, missing file, ...) into exit 2."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as exc:
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper
