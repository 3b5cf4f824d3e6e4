"""A video's sampled frames: when they are taken, what holds them, and how many fit
the pixel budget (the arithmetic only; decoding is :mod:`awt_engine.inputs.video`).

* **Memory: the pixel budget.** The n frames are kept together (the views' seed hashes
  all of them, and crops take random frames), as RGB uint8 in Pillow's storage, 4 bytes
  a pixel; nothing holds them as floats or at full size beside the reduced copies. They
  must fit ``pixel_budget`` (:data:`~awt_engine.inputs.base.DEFAULT_PIXEL_BUDGET`, 512 MiB)
  beside the decoder's working frames (:data:`DECODE_BYTES_PER_PIXEL` a pixel of the
  full frame, reserved at most at half the budget). When n frames at the size above do
  not fit, they are reduced by the smallest larger integer factor that does (box filter,
  ``Image.reduce``, as huge images), but never below R on the shorter side: view 0 is the
  shorter side resized to R, so down to R no view is upsampled where it was not before,
  while below R the frames would lose what the views show. A count that does not fit
  even then is refused, naming it and the most that fit (:func:`check_frame_count`
  refuses a count that no video could fit, before anything is decoded). Why reduce
  rather than decode fewer at a time: the seed needs every frame, so decoding in parts
  would decode every frame twice; why not refuse at once: 400 frames of a 720p clip
  (1.4 GB at full size) fit at half size (368 MB), still 360 px on the shorter side.
  The factor depends only on the frame size, n, R and the budget, never on the content,
  the batch or the order. Clips whose frames fit, the ordinary case (8 frames of 4K
  video take 265 MB), are never touched, so their pixels and results do not change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from awt_engine.inputs.base import DEFAULT_PIXEL_BUDGET, reduction_factor

# What decoding costs beyond its output, in bytes per pixel of the full frame: the
# decoder's reference frames (YUV 4:2:0, 1.5 B/px, up to ~8 of them) and one full-size
# RGB conversion (4 B/px) before a frame is reduced. An estimate for the pixel budget.
DECODE_BYTES_PER_PIXEL = 16


def check_count(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of frames must be an integer >= 1, got {n!r}")


def sample_times(duration: float, n: int) -> list[float]:
    """``n`` times (seconds from the clip's start) uniform over ``duration``: the centres
    of n equal segments, ``(k + 0.5) * duration / n`` for k = 0..n-1.

    Centres, not the ends: the first and last frames (often black, a fade or a title)
    are never picked, and each frame stands for an equal share of the clip.
    """
    check_count(n)
    duration = max(float(duration), 0.0)
    return [(k + 0.5) * duration / n for k in range(n)]


@dataclass(frozen=True)
class VideoFrames:
    """The sampled frames of one video, in time order."""

    frames: tuple[Image.Image, ...]  # RGB, upright, reduced like a huge image if enormous
    times: tuple[float, ...]  # seconds from the stream start of each frame shown
    sample_times: tuple[float, ...]  # the times asked for (sample_times(duration, n))
    duration: float  # seconds, the duration the samples cover
    codec: str = ""  # the decoder's name (h264, vp9, ...)
    decoded: int = 0  # frames the decoder produced to find them (a long clip's stays small)
    seeks: int = 0
    path: str = field(default="", compare=False)

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the frames."""
        return self.frames[0].size

    @property
    def nbytes(self) -> int:
        """Bytes of pixels held (Pillow's storage: 4 per RGB pixel); a frame shown at
        several sample times is one image, counted once."""
        distinct = {id(f): f for f in self.frames}.values()
        return sum(4 * f.width * f.height for f in distinct)


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def frame_bytes(width: int, height: int, factor: int) -> int:
    """One RGB frame reduced by ``factor`` in Pillow's storage (4 bytes a pixel)."""
    return -(-width // factor) * -(-height // factor) * 4


def _frames_room(width: int, height: int, budget: int) -> int:
    """Bytes the kept frames may take: the budget less the decoder's working frames,
    reserved at their estimate but at most at half the budget (a frame whose decoding
    needs more is decoded alone, as a huge image is)."""
    return budget - min(DECODE_BYTES_PER_PIXEL * width * height, budget // 2)


def fit_factor(size: tuple[int, int], n: int, target_size: int | None, budget: int | None) -> int:
    """The integer factor ``n`` frames of ``size`` (square pixels) are reduced by: the
    huge-image rule's, or the smallest larger one whose frames fit the budget, down to a
    shorter side of ``target_size`` (module docstring). ValueError naming ``n`` and the
    most that fit when none does."""
    width, height = size
    factor = reduction_factor(size, target_size)
    if budget is None:
        return factor
    room = _frames_room(width, height, budget)
    floor = max(factor, min(size) // target_size) if target_size is not None else factor
    for f in range(factor, floor + 1):
        if n * frame_bytes(width, height, f) <= room:
            return f
    smallest = frame_bytes(width, height, floor)
    if target_size is None:
        how = "(frames are not reduced without target_size)"
    elif floor == 1:
        how = f"at full size (reduced, they would be smaller than the views' {target_size} px)"
    else:
        reduced = f"{-(-width // floor)}x{-(-height // floor)}"
        how = f"even reduced to {reduced} (the views' {target_size} px on the shorter side)"
    raise ValueError(
        f"--frames {n}: {n} frames of {width}x{height} do not fit the "
        f"{fmt_bytes(budget)} pixel budget {how}; at most {room // smallest} "
        "frames of this video fit"
    )


def check_frame_count(
    n: int, target_size: int | None, pixel_budget: int | None = DEFAULT_PIXEL_BUDGET
) -> None:
    """ValueError naming ``n`` when ``n`` frames of the model's input size
    (``target_size`` R, R x R pixels) cannot fit ``pixel_budget``: frames are reduced no
    further than R on the shorter side, so such a count fits no video of that size or
    larger. Checked before anything is decoded (a usage error, exit 2 in the CLI); a
    video with larger frames is refused on its own when they do not fit even reduced
    (module docstring)."""
    check_count(n)
    if target_size is None or pixel_budget is None:
        return
    room = _frames_room(target_size, target_size, pixel_budget)
    smallest = frame_bytes(target_size, target_size, 1)
    if n * smallest > room:
        raise ValueError(
            f"--frames {n}: that many frames cannot fit the {fmt_bytes(pixel_budget)} "
            f"pixel budget: frames are kept at least at the model's input size "
            f"({target_size}x{target_size} px, {fmt_bytes(smallest)} each), so at most "
            f"{room // smallest} fit"
        )
