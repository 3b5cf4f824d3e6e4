"""Embedded label sets kept in memory: a bounded LRU keyed by :meth:`LabelSet.key`.

Per-request labels (issue 20) are embedded once: the first request with a new label set
is a miss (its embedding runs on the model's thread, through the on-disk text cache as
every caller's does), later ones are hits until the set falls out of the ``capacity``
least recently used. Sets that are ``pin`` ned (the server's default) are never dropped.
Two requests missing the same set at once share one computation. Thread-safe; torch-free
here (the computation is the caller's): entries are whatever it returns (``[C, P, D]``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from awt_engine.labels import LabelSet


class LabelSetCache:
    """Up to ``capacity`` embedded label sets (LRU) plus pinned ones, with hit/miss counts.

    ``compute(labels)`` gives a label set's embeddings; :meth:`future` arranges for it to
    run through ``submit`` (the batcher's :meth:`~awt_engine.serve.batcher.Batcher.call`).
    """

    def __init__(self, capacity: int, compute: Callable[[LabelSet], Any]):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 label sets, got {capacity}")
        self.capacity, self.compute = capacity, compute
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, Any] = OrderedDict()  # key -> embeddings, oldest first
        self._pinned: dict[str, Any] = {}
        self._inflight: dict[str, Future] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, labels: LabelSet) -> bool:
        key = labels.key()
        with self._lock:
            return key in self._entries or key in self._pinned

    def pin(self, labels: LabelSet, embeds: Any) -> None:
        """Keep ``embeds`` for ``labels`` for good (outside the LRU's bound)."""
        with self._lock:
            self._pinned[labels.key()] = embeds

    def put(self, labels: LabelSet, embeds: Any) -> None:
        """Keep ``embeds`` as the most recent entry, dropping the least recent beyond the bound."""
        key = labels.key()
        with self._lock:
            self._entries[key] = embeds
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def lookup(self, labels: LabelSet) -> Any | None:
        """The embeddings when held (a hit, made most recent), else None (counts nothing)."""
        key = labels.key()
        with self._lock:
            return self._held(key)

    def _held(self, key: str) -> Any | None:
        if key in self._pinned:
            self.hits += 1
            return self._pinned[key]
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        return None

    def future(self, labels: LabelSet, submit: Callable[[Callable[[], Any]], Future]) -> Future:
        """A Future of ``labels``' embeddings: done at once on a hit; on a miss computed via
        ``submit`` (once, however many callers wait for it) and then kept."""
        key = labels.key()
        proxy: Future = Future()
        with self._lock:
            held = self._held(key)
            if held is None and key in self._inflight:
                self.hits += 1  # computed once for both callers: no second encoding
                return self._inflight[key]
            if held is None:
                self.misses += 1
                self._inflight[key] = proxy
        if held is not None:
            proxy.set_result(held)
            return proxy

        def work() -> Any:
            embeds = self.compute(labels)
            self.put(labels, embeds)
            return embeds

        try:
            inner = submit(work)
        except BaseException as exc:
            self._forget(key, proxy)
            proxy.set_exception(exc)
            raise
        inner.add_done_callback(lambda done: self._settle(key, proxy, done))
        return proxy

    def _settle(self, key: str, proxy: Future, done: Future) -> None:
        self._forget(key, proxy)
        if proxy.done():  # cancelled by a waiter (callers should shield it)
            return
        if done.cancelled():
            proxy.cancel()
            return
        exc = done.exception()
        if exc is not None:
            proxy.set_exception(exc)
        else:
            proxy.set_result(done.result())

    def _forget(self, key: str, fut: Future) -> None:
        with self._lock:
            if self._inflight.get(key) is fut:
                del self._inflight[key]

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "label_cache_hits": self.hits,
                "label_cache_misses": self.misses,
                "label_cache_size": len(self._entries),
            }


__all__ = ["LabelSetCache"]
