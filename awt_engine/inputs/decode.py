"""The budgeted decode scheduler: any stream of inputs decoded on a thread pool, in
input order, within a budget of decoded pixels.

Memory: :func:`decode_images` holds at most ``pixel_budget`` bytes of decoded pixels
(default :data:`DEFAULT_PIXEL_BUDGET`), counting each image being decoded at its full
decoded size plus twice its output size, and each decoded image not yet taken by the
consumer at its output size (Pillow's storage: 4 bytes per RGB pixel). An image larger
than the budget is decoded alone.

Videos (:data:`awt_engine.inputs.base.VIDEO_EXTENSIONS`, recognised by extension) are found in
folders and globs beside images. :func:`decode_images` decodes one only when given
``frames``: its sampled frames (:mod:`awt_engine.inputs.video`) come back as a
:class:`~awt_engine.inputs.frames.VideoFrames` in ``DecodedImage.image``, counted against the
budget as all its frames plus the decoder's working frames; frames that would not fit
the budget are reduced until they do (with either number of workers), and a count that
cannot fit is refused.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from awt_engine.inputs.arrays import as_rgb_image
from awt_engine.inputs.base import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_PIXEL_BUDGET,
    DecodedImage,
    EncodedImage,
    ImageDecodeError,
    check_target_size,
    exception_reason,
    image_bytes,
    input_label,
    is_video_path,
)
from awt_engine.inputs.frames import check_frame_count
from awt_engine.inputs.pil import decode_opened, open_for_decode
from awt_engine.inputs.video import open_video


def decode_images(
    paths: Iterable[Any],
    *,
    workers: int = 2,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    prefetch: int | None = None,
    target_size: int | None = None,
    pixel_budget: int | None = DEFAULT_PIXEL_BUDGET,
    frames: int | None = None,
) -> Iterator[DecodedImage]:
    """Decode ``paths`` on a thread pool and yield one :class:`DecodedImage` per input,
    in input order.

    At most ``prefetch`` (default ``2 * workers``) images are decoded ahead of the one
    being consumed, so a large folder is never held in memory at once; and at most
    ``pixel_budget`` bytes of decoded pixels (default :data:`DEFAULT_PIXEL_BUDGET`, None:
    no limit) are held by decodes in flight and decoded images not yet consumed (an image
    bigger than the budget is decoded alone). ``target_size``: the views' size R, so that
    huge images are decoded reduced (module docstring). ``paths`` may be a lazy iterable;
    items may also be PIL images or numpy arrays (their ``path`` then reads
    ``<input N>``). ``frames``: a video file (by extension) gives that many sampled frames
    as a :class:`~awt_engine.inputs.frames.VideoFrames`, reduced when they must be to fit
    ``pixel_budget`` (ValueError at once for a count that no video could fit:
    :func:`awt_engine.inputs.frames.check_frame_count`); None: videos are refused (an error
    each), for callers that take images only. Never raises for a bad image: its
    ``error`` says why.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if prefetch is None:
        prefetch = 2 * workers
    if prefetch < 1:
        raise ValueError(f"prefetch must be at least 1, got {prefetch}")
    if max_pixels is not None and max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive or None, got {max_pixels}")
    if pixel_budget is not None and pixel_budget <= 0:
        raise ValueError(
            f"pixel_budget must be a positive number of bytes or None, got {pixel_budget}"
        )
    check_target_size(target_size)
    if frames is not None and (
        isinstance(frames, bool) or not isinstance(frames, int) or frames < 1
    ):
        raise ValueError(f"frames must be an integer >= 1 or None, got {frames!r}")
    if frames is not None:  # a count no video could hold is a usage error, not N error rows
        check_frame_count(frames, target_size, pixel_budget)
    return _decode_stream(
        enumerate(paths), workers, prefetch, max_pixels, target_size, pixel_budget, frames
    )


def _decode_stream(
    items: Iterator[tuple[int, Any]],
    workers: int,
    prefetch: int,
    max_pixels: int | None,
    target_size: int | None,
    pixel_budget: int | None,
    frames: int | None = None,
) -> Iterator[DecodedImage]:
    if workers == 1:
        for index, item in items:
            yield _decode_one(index, item, max_pixels, target_size, frames, pixel_budget)
        return
    stream = _BudgetedDecodes(workers, max_pixels, target_size, pixel_budget, frames)
    try:
        for index, item in items:
            stream.add(index, item)
            if stream.pending > prefetch:
                yield from stream.hand_over()
        while stream.pending:
            yield from stream.hand_over()
    finally:
        stream.close()


@dataclass
class _Job:
    """An input ready to decode: its label, what decoding it holds, and how to do it."""

    label: str
    cost: int  # bytes of pixels held while it decodes
    run: Callable[[], Any]  # -> Image.Image, or VideoFrames
    close: Callable[[], None]  # frees the opened file when the job never runs


class _Slot:
    """One input on its way: header read (``plan``), admitted, decoded (``result``)."""

    def __init__(self, plan: Future):
        self.plan = plan  # -> _Job | DecodedImage (an input that failed before decoding)
        self.decode: Future | None = None  # the admitted decode
        self.result: Future[DecodedImage] = Future()
        self.reserved = 0  # bytes counted against the budget for this input


class _BudgetedDecodes:
    """Decodes in input order under a budget of decoded bytes.

    Each input's header is read on the pool (cheap, gives the decode's cost); decodes
    are admitted strictly in input order, whenever the bytes reserved so far plus the
    next one's cost fit the budget, or nothing is reserved at all (a huge image then
    decodes alone). Admission runs in the pool's completion callbacks and when the
    consumer takes an image, so decoding goes on while the consumer works, and no
    worker ever waits for the budget (an abandoned stream cannot block a thread).
    A finished decode keeps its output's bytes reserved until the consumer comes back
    for the next image. The head of the queue can always be admitted: everything
    before it has been handed over and released, and nothing after it admitted.
    """

    def __init__(
        self,
        workers: int,
        max_pixels: int | None,
        target_size: int | None,
        budget: int | None,
        frames: int | None = None,
    ):
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="awt-decode")
        self.max_pixels = max_pixels
        self.target_size = target_size
        self.frames = frames
        self.budget = budget
        self.lock = threading.RLock()  # callbacks may run inline, inside _admit
        self.slots: deque[_Slot] = deque()  # not yet handed over, in input order
        self.used = 0  # bytes reserved by admitted inputs not yet released
        self.closed = False

    @property
    def pending(self) -> int:
        return len(self.slots)

    def add(self, index: int, item: Any) -> None:
        plan = self.executor.submit(
            _plan, index, item, self.max_pixels, self.target_size, self.frames, self.budget
        )
        with self.lock:
            self.slots.append(_Slot(plan))
        plan.add_done_callback(lambda _: self._admit())

    def hand_over(self) -> Iterator[DecodedImage]:
        """Yield the oldest input's outcome; release its bytes when the consumer is back."""
        slot = self.slots[0]
        planned = slot.plan.result()
        if self._oversized(planned):
            decoded = self._run_alone(slot, planned)
        else:
            decoded = slot.result.result()
        with self.lock:
            self.slots.popleft()
        try:
            yield decoded
        finally:
            with self.lock:
                self.used -= slot.reserved
                slot.reserved = 0
            self._admit()

    def _admit(self) -> None:
        with self.lock:
            for slot in list(self.slots):
                if self.closed:
                    return
                if slot.decode is not None or slot.result.done():
                    continue
                if not slot.plan.done():
                    return  # in order: later inputs wait for this one
                planned = slot.plan.result()
                if isinstance(planned, DecodedImage):
                    slot.result.set_result(planned)
                    continue
                if self._oversized(planned):
                    return  # decoded alone by the consumer's thread, when at the head
                if self.budget is not None and self.used + planned.cost > self.budget:
                    return
                try:
                    slot.decode = self.executor.submit(_run, planned)
                except RuntimeError:  # the pool is shutting down (interpreter exit)
                    return
                self.used += planned.cost
                slot.reserved = planned.cost
                slot.decode.add_done_callback(lambda fut, slot=slot: self._decoded(slot, fut))

    def _oversized(self, planned: _Job | DecodedImage) -> bool:
        return isinstance(planned, _Job) and self.budget is not None and planned.cost > self.budget

    def _run_alone(self, slot: _Slot, job: _Job) -> DecodedImage:
        """Decode an input bigger than the budget, now that nothing else is reserved.

        It runs on the consumer's thread, which would only wait for it anyway: all such
        decodes then share one thread's malloc arena, so the memory one leaves behind
        is reused by the next instead of each pool thread keeping its own copy.
        """
        with self.lock:
            self.used += job.cost  # blocks every later admission until it is done
            slot.reserved = job.cost
        decoded = _run(job)
        with self.lock:
            held = image_bytes(decoded.image) if decoded.ok else 0
            self.used += held - slot.reserved
            slot.reserved = held
        return decoded

    def _decoded(self, slot: _Slot, fut: Future) -> None:
        if fut.cancelled():
            return
        decoded = fut.result()  # _run never raises
        with self.lock:
            held = image_bytes(decoded.image) if decoded.ok else 0
            self.used += held - slot.reserved  # the decode's peak is over: keep the output's
            slot.reserved = held
            slot.result.set_result(decoded)
        self._admit()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            slots = list(self.slots)
        for slot in slots:
            slot.plan.cancel()
            if slot.decode is not None:
                slot.decode.cancel()
        self.executor.shutdown(wait=True, cancel_futures=True)
        for slot in slots:  # opened files whose decode never ran
            if slot.plan.done() and not slot.plan.cancelled():
                planned = slot.plan.result()
                if isinstance(planned, _Job) and (slot.decode is None or slot.decode.cancelled()):
                    planned.close()


def _plan(
    index: int,
    item: Any,
    max_pixels: int | None,
    target_size: int | None,
    frames: int | None = None,
    pixel_budget: int | None = DEFAULT_PIXEL_BUDGET,
) -> _Job | DecodedImage:
    """Read the header of a file input (in-memory inputs need none); never raises."""
    label = input_label(index, item)
    if isinstance(item, (str, os.PathLike)) and is_video_path(item):
        return _plan_video(label, item, max_pixels, target_size, frames, pixel_budget)
    if isinstance(item, EncodedImage) and is_video_path(item.name):
        # videos are decoded by seeking in a file; bytes (a Ray binary read) have none
        reason = "a video given as bytes: videos are read from local files (give its path)"
        return DecodedImage(path=label, image=None, error=reason)
    if isinstance(item, (str, os.PathLike, EncodedImage)):
        try:
            opened = open_for_decode(item, max_pixels, target_size)
        except ImageDecodeError as exc:
            return DecodedImage(path=label, image=None, error=exc.reason)
        except Exception as exc:
            return DecodedImage(path=label, image=None, error=exception_reason(exc))
        return _Job(label, opened.cost, lambda: decode_opened(opened, target_size), opened.im.close)
    size = getattr(item, "size", None) if isinstance(item, Image.Image) else None
    if isinstance(item, np.ndarray) and item.ndim >= 2:
        size = (item.shape[1], item.shape[0])
    cost = 2 * 4 * size[0] * size[1] if size else 0  # its RGB copy and one intermediate
    return _Job(
        label,
        cost,
        lambda: as_rgb_image(item, max_pixels=max_pixels, target_size=target_size),
        lambda: None,
    )


def _plan_video(
    label: str,
    path: str | os.PathLike,
    max_pixels: int | None,
    target_size: int | None,
    frames: int | None,
    pixel_budget: int | None = DEFAULT_PIXEL_BUDGET,
) -> _Job | DecodedImage:
    """Open a video and read its header (its frames decode in the job); never raises.
    Its frames are reduced to fit ``pixel_budget`` when they must (awt_engine.inputs.frames)."""
    if frames is None:
        return DecodedImage(
            path=label,
            image=None,
            error="is a video; only images are read here (videos need frames=N)",
        )
    try:
        opened = open_video(
            path, frames, target_size=target_size, max_pixels=max_pixels, pixel_budget=pixel_budget
        )
    except ImageDecodeError as exc:
        return DecodedImage(path=label, image=None, error=exc.reason)
    except Exception as exc:
        return DecodedImage(path=label, image=None, error=exception_reason(exc))

    def run():
        try:
            return opened.read()
        finally:
            opened.close()

    return _Job(label, opened.cost, run, opened.close)


def _run(job: _Job) -> DecodedImage:
    """Decode a planned input; never raises (a bad item must not end the run)."""
    try:
        image = job.run()
    except ImageDecodeError as exc:
        return DecodedImage(path=job.label, image=None, error=exc.reason)
    except Exception as exc:
        return DecodedImage(path=job.label, image=None, error=exception_reason(exc))
    return DecodedImage(path=job.label, image=image, error=None)


def _decode_one(
    index: int,
    item: Any,
    max_pixels: int | None,
    target_size: int | None = None,
    frames: int | None = None,
    pixel_budget: int | None = DEFAULT_PIXEL_BUDGET,
) -> DecodedImage:
    planned = _plan(index, item, max_pixels, target_size, frames, pixel_budget)
    return planned if isinstance(planned, DecodedImage) else _run(planned)
