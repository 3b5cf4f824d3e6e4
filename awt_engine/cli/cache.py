"""`awt-engine cache` commands (placeholder until implemented)."""

from awt_engine.cli._app import app  # noqa: F401
