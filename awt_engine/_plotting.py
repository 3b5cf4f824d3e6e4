"""matplotlib, loaded only when a picture is drawn (the ``explain`` extra).

:func:`pyplot` returns ``matplotlib.pyplot`` on the Agg backend (files only, no window,
safe on a server or in a worker thread), or raises an ImportError that says what to
install. :func:`plain` escapes text so matplotlib draws it as is.
"""

from __future__ import annotations

INSTALL_HINT = "uv sync --extra explain (or pip install 'awt-engine[explain]')"


def pyplot(what: str = "this picture", note: str = ""):
    """matplotlib.pyplot on the Agg backend, or an ImportError "<what> needs matplotlib:
    uv sync --extra explain (...)" followed by ``note`` (what works without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        tail = f"; {note}" if note else ""
        raise ImportError(f"{what} needs matplotlib: {INSTALL_HINT}{tail}") from exc
    return plt


def plain(text: str) -> str:
    """``text`` drawn as is by matplotlib: every ``$`` escaped, so it is never read as
    mathtext (matplotlib shows ``\\$`` as ``$``)."""
    return text.replace("$", r"\$")
