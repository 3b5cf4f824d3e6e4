"""The server's metrics in the Prometheus text exposition format (version 0.0.4), by hand.

Nothing here needs ``prometheus_client``: the app counts in :class:`Metrics` (one event
loop, so plain ints), and :func:`render` writes the page ``GET /metrics`` serves, adding
what the service counts itself (:meth:`ClassifyService.stats`). Families:

==========================================  =========  ===============================
awt_http_requests_total{route,method,code}  counter    every answered request
awt_http_request_duration_seconds{route}    histogram  time to the last byte sent
awt_images_total{route}                     counter    images received (classify, embed)
awt_batch_size                              histogram  images per model batch (service)
awt_queue_depth                             gauge      images waiting for a batch
awt_label_cache_hits_total / _misses_total  counter    label sets found / embedded
awt_images_dropped_total                    counter    images dropped (client gone, timeout)
awt_ready                                   gauge      1 once the model and labels are in
==========================================  =========  ===============================

``route`` is the route's path template (``/v1/classify``), or ``other`` for a path no
route matches, so a scan of random URLs cannot grow the label set without bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# Request latency buckets in seconds: 5 ms (a health probe) to 60 s (the default timeout).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    """Counts per upper bound (not cumulative until written), their sum and count."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        i = next((k for k, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        self.counts[i] += n
        self.sum += value * n
        self.count += n

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out, running = [], 0
        for bound, k in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += k
            out.append(f'{name}_bucket{{{labels}{sep}le="{_number(bound)}"}} {running}')
        braces = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{braces} {_number(self.sum)}")
        out.append(f"{name}_count{braces} {self.count}")
        return out


class Metrics:
    """What the app counts: requests by route, method and status, their latency, images."""

    def __init__(self):
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.images: dict[str, int] = {}

    def record(self, route: str, method: str, status: int, seconds: float, images: int) -> None:
        key = (route, method, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)
        if images:
            self.images[route] = self.images.get(route, 0) + images


def render(metrics: Metrics, stats: Mapping, ready: bool, max_batch: int) -> str:
    """The exposition page: the app's counts and the service's ``stats``
    (queue_depth, batches {size: count}, label_cache_hits, label_cache_misses,
    images_dropped)."""
    out: list[str] = []
    _family(out, "awt_http_requests_total", "counter", "HTTP requests answered.")
    for (route, method, status), n in sorted(metrics.requests.items()):
        out.append(
            f'awt_http_requests_total{{route="{_label(route)}",method="{_label(method)}",'
            f'code="{status}"}} {n}'
        )
    _family(out, "awt_http_request_duration_seconds", "histogram", "Time to answer a request.")
    for route, hist in sorted(metrics.latency.items()):
        out += hist.lines("awt_http_request_duration_seconds", f'route="{_label(route)}"')
    _family(out, "awt_images_total", "counter", "Images received, by route.")
    for route, n in sorted(metrics.images.items()):
        out.append(f'awt_images_total{{route="{_label(route)}"}} {n}')
    _family(out, "awt_batch_size", "histogram", "Images per model batch.")
    out += _batch_histogram(stats.get("batches") or {}, max_batch).lines("awt_batch_size")
    scalars = (
        ("awt_queue_depth", "gauge", "Images waiting for a batch.", "queue_depth"),
        ("awt_label_cache_hits_total", "counter", "Label sets found embedded.", "label_cache_hits"),
        (
            "awt_label_cache_misses_total",
            "counter",
            "Label sets embedded on request.",
            "label_cache_misses",
        ),
        ("awt_images_dropped_total", "counter", "Images dropped unscored.", "images_dropped"),
    )
    for name, kind, text, key in scalars:
        _family(out, name, kind, text)
        out.append(f"{name} {int(stats.get(key, 0) or 0)}")
    _family(out, "awt_ready", "gauge", "1 once the model and the default labels are loaded.")
    out.append(f"awt_ready {int(bool(ready))}")
    return "\n".join(out) + "\n"


def _batch_histogram(batches: Mapping, max_batch: int) -> Histogram:
    """The service's batch-size counts {size: batches} as a histogram over powers of two
    up to ``max_batch`` (and ``max_batch`` itself)."""
    bounds, b = [], 1
    while b < max_batch:
        bounds.append(float(b))
        b *= 2
    hist = Histogram((*bounds, float(max_batch)))
    for size, n in sorted(batches.items(), key=lambda kv: int(kv[0])):
        hist.observe(float(size), int(n))
    return hist


def _family(out: list[str], name: str, kind: str, text: str) -> None:
    out.append(f"# HELP {name} {text}")
    out.append(f"# TYPE {name} {kind}")


def _label(value: str) -> str:
    """A label value escaped as the format asks (backslash, quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else f"{value:.1f}"


__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "Histogram", "Metrics", "render"]
