"""Request-level errors of the server, each with the HTTP status it answers with.

A problem with one image of a request (unreadable, over the pixel budget, a
decompression bomb) is never one of these: it is that image's error row. These are for
the request as a whole. Imports nothing (no torch), so the HTTP layer can map them to
responses cheaply.
"""

from __future__ import annotations


class ServeError(Exception):
    """A request that cannot be answered: ``status`` (HTTP) and a human ``message``."""

    status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(ServeError):
    """Malformed input (400)."""

    status = 400


class TooLarge(ServeError):
    """Too many images in one request, or a body too big (413)."""

    status = 413


class Unprocessable(ServeError):
    """Well-formed but unusable: too many labels, unknown scorer, bad template, views over
    the server's maximum, label-set errors, an unreadable image to embed (422)."""

    status = 422


class QueueFull(ServeError):
    """The server cannot take more work now (queue full, decoded-pixel budget full, or
    stopping): retry after ``retry_after`` seconds (503)."""

    status = 503

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class Timeout(ServeError):
    """The request ran over the server's timeout; its queued images were dropped (504)."""

    status = 504


__all__ = ["BadRequest", "QueueFull", "ServeError", "Timeout", "TooLarge", "Unprocessable"]
