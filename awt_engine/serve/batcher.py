"""The dynamic batcher: items of concurrent requests gathered into batches for one worker
thread, which runs every model call.

Design (issue 20): the worker takes the oldest queued item and waits until ``max_batch``
items are queued or that item has waited ``max_wait`` seconds, then runs them as one
batch; ``max_queue`` bounds the items waiting (``submit`` beyond it raises
:class:`~awt_engine.serve.errors.QueueFull`, nothing queued). Other work that must run on
the model's thread (a label set to embed, texts to encode) goes through :meth:`call` and
runs between batches, ahead of the next one. Waits are bounded condition waits, never a
busy loop. A request's items may be taken back (:meth:`discard`) while still queued: its
client left or it timed out; what already runs finishes and its result is ignored.

Torch-free: the batch function (the service's) does the model work; this module only
schedules. Axes: none (items are opaque; a batch is a list of up to ``max_batch``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from awt_engine.serve.errors import QueueFull

log = logging.getLogger(__name__)


class Batcher:
    """One worker thread running ``run(batch)`` on batches of queued items.

    ``on_error(batch, exc)`` is told when ``run`` raises (the service fails the batch's
    requests with it); the worker carries on with the next batch.
    """

    def __init__(
        self,
        run: Callable[[list[Any]], None],
        *,
        max_batch: int,
        max_wait: float,
        max_queue: int,
        on_error: Callable[[list[Any], BaseException], None] | None = None,
        name: str = "awt-serve-batch",
    ):
        if max_batch < 1 or max_queue < 1 or max_wait < 0:
            raise ValueError(
                f"need max_batch >= 1, max_queue >= 1, max_wait >= 0; got {max_batch}, "
                f"{max_queue}, {max_wait}"
            )
        self.run, self.on_error, self.name = run, on_error, name
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait, max_queue
        self._cond = threading.Condition()
        self._queue: deque[tuple[float, Any]] = deque()  # (enqueued at, item), oldest first
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.batch_sizes: Counter[int] = Counter()  # batch size -> batches run

    # -- the callers' side ----------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    @property
    def depth(self) -> int:
        """Items waiting (not yet taken into a batch)."""
        with self._cond:
            return len(self._queue)

    @property
    def accepting(self) -> bool:
        with self._cond:
            return not self._closing

    def submit(self, items: Sequence[Any]) -> None:
        """Queue ``items`` together, or none of them: QueueFull when there is no room for
        all, or the batcher is stopping."""
        now = time.monotonic()
        with self._cond:
            if self._closing:
                raise QueueFull("the server is stopping")
            if len(self._queue) + len(items) > self.max_queue:
                raise QueueFull(
                    f"the queue is full ({len(self._queue)} of {self.max_queue} images waiting)"
                )
            self._queue.extend((now, item) for item in items)
            self._cond.notify_all()

    def discard(self, items: Sequence[Any]) -> int:
        """Take those of ``items`` still queued out of the queue; how many were."""
        ids = {id(item) for item in items}
        with self._cond:
            kept = deque(entry for entry in self._queue if id(entry[1]) not in ids)
            dropped = len(self._queue) - len(kept)
            self._queue = kept
            self._cond.notify_all()
        return dropped

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` on the worker thread, before the next batch; its Future."""
        fut: Future = Future()
        with self._cond:
            if self._closing:
                raise QueueFull("the server is stopping")
            self._calls.append((fn, fut))
            self._cond.notify_all()
        return fut

    def stop(self, drain: bool = True, timeout: float | None = None) -> list[Any]:
        """Refuse new items; run the queued ones (``drain``) or take them out; wait for the
        worker. Returns the items taken out undone (empty when draining)."""
        with self._cond:
            self._closing = True
            left = [] if drain else [item for _, item in self._queue]
            if not drain:
                self._queue.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        return left

    # -- the worker's side ----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            call, batch = self._next()
            if call is not None:
                _run_call(*call)
            elif batch is not None:
                self._run_batch(batch)
            else:
                return

    def _next(self) -> tuple[tuple[Callable, Future] | None, list[Any] | None]:
        """The next call or batch, waiting as needed; (None, None) once stopped and empty."""
        with self._cond:
            while True:
                if self._calls:
                    return self._calls.popleft(), None
                if self._queue:
                    wait = self._queue[0][0] + self.max_wait - time.monotonic()
                    if len(self._queue) >= self.max_batch or wait <= 0 or self._closing:
                        n = min(self.max_batch, len(self._queue))
                        return None, [self._queue.popleft()[1] for _ in range(n)]
                    self._cond.wait(wait)
                elif self._closing:
                    return None, None
                else:
                    self._cond.wait()

    def sizes(self) -> dict[int, int]:
        """Batch size -> how many batches of that size ran."""
        with self._cond:
            return dict(sorted(self.batch_sizes.items()))

    def _run_batch(self, batch: list[Any]) -> None:
        with self._cond:
            self.batch_sizes[len(batch)] += 1
        try:
            self.run(batch)
        except BaseException as exc:
            log.exception("batch of %d failed", len(batch))
            if self.on_error is not None:
                try:
                    self.on_error(batch, exc)
                except Exception:
                    log.exception("reporting a failed batch failed")


def _run_call(fn: Callable[[], Any], fut: Future) -> None:
    if not fut.set_running_or_notify_cancel():
        return
    try:
        fut.set_result(fn())
    except BaseException as exc:
        fut.set_exception(exc)


__all__ = ["Batcher"]
