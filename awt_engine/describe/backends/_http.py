"""HTTP plumbing of the OpenAI-compatible backend: retryable failures, a total deadline per
request, the answer's size cap, and Retry-After.

A socket timeout bounds each read only: a server sending a byte per read would hold a
request forever. :class:`Deadline` shuts the request's sockets when its time is up (the
connections made through :class:`HTTPHandler` / :class:`HTTPSHandler` register theirs),
and :func:`read_capped` reads at most the cap.
"""

from __future__ import annotations

import email.utils
import http.client
import socket
import threading
import time
import urllib.request
from collections.abc import Callable

ERROR_BODY_BYTES = 4096  # read of an error answer: enough for its message, never a flood


class Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Rejected(Retryable):
    """The answer itself failed (too large, too slow): retried, then only this request is
    given up, where a failing server (refused, unreachable, silent) stops the run."""


# ----------------------------------------------------------------------------------------------
# the total deadline of one request
# ----------------------------------------------------------------------------------------------
_current = threading.local()  # .deadline: the Deadline of the request this thread is sending


class Deadline:
    """Shuts the sockets of one request when its time is up, which makes any blocked read of
    it fail at once. A socket timeout bounds each read only: a server sending one byte per
    read would otherwise hold the request (and its worker) forever."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._finished = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> Deadline:
        _current.deadline = self
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.finish()

    def finish(self) -> None:
        """Stop watching (call before the sockets are closed, so none is shut after)."""
        with self._lock:
            self._finished = True
            self._socks.clear()
        self._timer.cancel()
        _current.deadline = None

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            if self._finished:
                return
            if self.expired:
                _shut(sock)
            else:
                self._socks.append(sock)

    def _expire(self) -> None:
        with self._lock:
            if self._finished:
                return
            self.expired = True
            for sock in self._socks:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


def _watched(connect: Callable[[], None], conn: http.client.HTTPConnection) -> None:
    connect()
    deadline = getattr(_current, "deadline", None)
    if deadline is not None and conn.sock is not None:
        deadline.watch(conn.sock)


class _HTTPConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        _watched(super().connect, self)


class _HTTPSConnection(http.client.HTTPSConnection):
    def connect(self) -> None:
        _watched(super().connect, self)  # the TLS socket, once wrapped


class HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_HTTPConnection, req)


class HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        # No context given: http.client's default one (certificates and host name checked).
        return self.do_open(_HTTPSConnection, req)


def read_capped(resp, limit: int) -> bytes:
    """The whole body of ``resp``; :class:`Rejected` as soon as it exceeds ``limit`` bytes
    (never more than ``limit`` + 64 KiB is held)."""
    declared = resp.headers.get("Content-Length", "")
    if declared.strip().isdigit() and int(declared) > limit:
        raise Rejected(f"answer of {int(declared)} bytes is larger than the {limit}-byte cap")
    chunks, size = [], 0
    while True:
        chunk = resp.read(min(65536, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise Rejected(f"answer is larger than the {limit}-byte cap")
        chunks.append(chunk)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
