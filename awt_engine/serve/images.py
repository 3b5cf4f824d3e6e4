"""Request images: bytes -> a decoded RGB image, under the server's pixel budget.

Decoding is the engine's own (:mod:`awt_engine.inputs.pil`: header checks and the
decompression-bomb limit before any pixel is decoded, EXIF orientation, huge images
decoded reduced for the model's input size R), exactly as ``classify`` decodes the same
file, so a served image's views equal the offline ones. What the server adds is a budget
across requests: every image holds its decode's peak bytes while decoding, then its
decoded bytes until the worker has made its views (:class:`PixelBudget`). An image that
alone would need more than the whole budget is that image's error row (never an
out-of-memory); a budget momentarily full is :class:`~awt_engine.serve.errors.QueueFull`
(503, retry). A request's holds are released when it ends, whatever way it ends
(:class:`Holds`), so a cancelled request leaks nothing.

Axes: none (PIL images; bytes of pixels).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from awt_engine.inputs.base import (
    DEFAULT_MAX_PIXELS,
    EncodedImage,
    ImageDecodeError,
    exception_reason,
    image_bytes,
)
from awt_engine.inputs.pil import decode_opened, open_for_decode
from awt_engine.serve.errors import QueueFull


class PixelBudget:
    """Bytes of decoded pixels held at once, across requests (thread-safe)."""

    def __init__(self, total: int):
        self.total = total
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.total:
                return False
            self.used += n
            return True

    def change(self, n: int) -> None:
        """Add ``n`` bytes (negative: release) to what is held."""
        with self._lock:
            self.used += n


class Hold:
    """Bytes one image holds in the budget; :meth:`release` is idempotent."""

    def __init__(self, budget: PixelBudget, n: int):
        self.budget, self.n = budget, n
        self._lock = threading.Lock()

    def resize(self, n: int) -> None:
        with self._lock:
            if self.n:
                self.budget.change(n - self.n)
                self.n = n

    def release(self) -> None:
        with self._lock:
            n, self.n = self.n, 0
        if n:
            self.budget.change(-n)


class Holds:
    """One request's holds: :meth:`close` releases them all, and any taken afterwards
    (a decode still running when its request was cancelled) is released at once."""

    def __init__(self, budget: PixelBudget):
        self.budget = budget
        self._held: list[Hold] = []
        self._closed = False
        self._lock = threading.Lock()

    def take(self, n: int) -> Hold | None:
        """A hold of ``n`` bytes; None once the request is closed; QueueFull when the
        budget has no room now."""
        with self._lock:
            if self._closed:
                return None
            if not self.budget.reserve(n):
                raise QueueFull(
                    f"the server's decoded-pixel budget is full ({self.budget.total} bytes)"
                )
            hold = Hold(self.budget, n)
            self._held.append(hold)
            return hold

    def close(self) -> None:
        with self._lock:
            self._closed = True
            held, self._held = self._held, []
        for hold in held:
            hold.release()


@dataclass
class Decoded:
    """A decoded image (RGB PIL) and the bytes it holds."""

    image: Any
    hold: Hold


def decode_image(data: bytes, index: int, size: int, holds: Holds) -> Decoded | str:
    """Decode one request image for views of ``size`` R: a :class:`Decoded`, or the reason
    it cannot be used (a string: that image's error row). Raises QueueFull only."""
    if not isinstance(data, bytes | bytearray | memoryview):
        return f"not image bytes ({type(data).__name__})"
    source = EncodedImage(f"image {index}", bytes(data))
    try:
        opened = open_for_decode(source, DEFAULT_MAX_PIXELS, size)
    except ImageDecodeError as exc:
        return exc.reason
    except Exception as exc:
        return exception_reason(exc)
    if opened.cost > holds.budget.total:
        opened.im.close()
        return (
            f"image too large: decoding it needs {opened.cost:,} bytes, over the server's "
            f"pixel budget of {holds.budget.total:,}"
        )
    try:
        hold = holds.take(opened.cost)
    except QueueFull:
        opened.im.close()
        raise
    if hold is None:
        opened.im.close()
        return "the request ended"
    try:
        image = decode_opened(opened, size)
    except ImageDecodeError as exc:
        hold.release()
        return exc.reason
    except Exception as exc:
        hold.release()
        return exception_reason(exc)
    hold.resize(image_bytes(image))
    return Decoded(image, hold)


__all__ = ["Decoded", "Hold", "Holds", "PixelBudget", "decode_image"]
