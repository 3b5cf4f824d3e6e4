"""Video files as inputs: a few frames sampled over the clip, decoded by seeking.

A video is classified from ``n`` frames (``ViewConfig.frames``, default 8) sampled
uniformly over its duration: frame k is the first frame at or after
:func:`sample_times`' time k, the centre of the k-th of n equal segments of the clip.
Its views are made from those frames (:func:`awt_engine.views.make_video_views`); the
rest of the engine treats it as an image (docs/design.md section 2.1).

Decoding (PyAV, FFmpeg's decoders in the wheel; the optional extra ``video``, imported
only when a video is read):

* **Seeking, bounded memory.** For each sample time the container seeks to the nearest
  keyframe at or before it (``container.seek`` in the stream's time base) and decodes
  forward to the first frame at or after it; only the chosen frames are kept (RGB, like
  a decoded image). When the next sample lies within one keyframe interval ahead
  (the longest seen so far, at least 1 s), decoding goes on forward instead, since a
  seek would land no further. A long video is therefore never decoded or held whole:
  the work is about n keyframe intervals, however long the file.
* **Duration.** The video stream's own (its header's duration, its Matroska
  ``DURATION`` tag, or its frame count over its frame rate), else the container's; a
  stream with none of them (a live recording) is measured by seeking to its last
  keyframe and reading the packets after it (their timestamps, no decoding; the whole
  file is read, still undecoded, only when that seek fails).
  Timestamps are used throughout, so variable frame rates need nothing special.
* **Frames** are RGB, stretched to square pixels by the sample aspect ratio (720 x 576
  at 16:15 shows as 768 x 576), rotated upright by the stream's display rotation
  (multiples of 90 degrees, as players do; flips are ignored), and reduced like huge images
  (:mod:`awt_engine.images`): a frame whose shorter side is at least 32 R is reduced
  by an integer factor. A frame larger than ``max_pixels`` is refused.
* **Memory: the pixel budget.** The n frames are kept together (the views' seed hashes
  all of them, and crops take random frames), as RGB uint8 in Pillow's storage, 4 bytes
  a pixel; nothing holds them as floats or at full size beside the reduced copies. They
  must fit ``pixel_budget`` (:data:`~awt_engine.images.DEFAULT_PIXEL_BUDGET`, 512 MiB)
  beside the decoder's working frames (:data:`_DECODE_BYTES_PER_PIXEL` a pixel of the
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
* **Errors** are :class:`~awt_engine.images.ImageDecodeError` (the path and a reason):
  "not a video (no video stream; audio only)", "no frames", "unsupported codec ...",
  "truncated or corrupt video (...)". A video counts as truncated when its frames end
  before the last sample's segment begins (before (n-1)/n of the duration its header
  states); frames missing only at the very end are taken as the last frame. When only
  the container's duration is known and other streams (sound) may outlast the picture,
  an early end is the video's end instead: the frames are sampled again over it.

Videos are recognised by their extension (:data:`VIDEO_EXTENSIONS`).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from PIL import Image

from awt_engine.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_PIXEL_BUDGET,
    ImageDecodeError,
    _check_target_size,
    _detail,
    _fmt_pixels,
    _reduction_factor,
    check_input_file,
)

__all__ = [
    "DEFAULT_FRAMES",
    "VIDEO_EXTENSIONS",
    "OpenedVideo",
    "VideoFrames",
    "check_frame_count",
    "decode_frames",
    "is_video_path",
    "open_video",
    "sample_times",
]

VIDEO_EXTENSIONS: frozenset[str] = frozenset({".mp4", ".avi", ".mkv", ".webm", ".mov"})

# Frames sampled per video: 8, a common test-time clip length of CLIP video models
# (X-CLIP's and ActionCLIP's 8-frame settings); each becomes a view (of 51 by default).
DEFAULT_FRAMES: int = 8

INSTALL_HINT = "video files need PyAV: uv sync --extra video (or pip install 'awt-engine[video]')"

# Decode forward (rather than seek) to a sample at most this far ahead when no longer
# keyframe interval has been seen: a seek could land no further ahead than that.
_FORWARD_S = 1.0
# Two timestamps closer than this are the same instant (float rounding of pts * time base).
_EPS_S = 1e-6
# Seek this far past a stream's start to find its last keyframe (about 115 days).
_FAR_S = 10_000_000
# What decoding costs beyond its output, in bytes per pixel of the full frame: the
# decoder's reference frames (YUV 4:2:0, 1.5 B/px, up to ~8 of them) and one full-size
# RGB conversion (4 B/px) before a frame is reduced. An estimate for the pixel budget.
_DECODE_BYTES_PER_PIXEL = 16

_LOG_LOCK = threading.Lock()


def is_video_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a video by its extension (any case)."""
    return os.path.splitext(os.fspath(path))[1].lower() in VIDEO_EXTENSIONS


def _check_count(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of frames must be an integer >= 1, got {n!r}")


def sample_times(duration: float, n: int) -> list[float]:
    """``n`` times (seconds from the clip's start) uniform over ``duration``: the centres
    of n equal segments, ``(k + 0.5) * duration / n`` for k = 0..n-1.

    Centres, not the ends: the first and last frames (often black, a fade or a title)
    are never picked, and each frame stands for an equal share of the clip.
    """
    _check_count(n)
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


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def _frame_bytes(width: int, height: int, factor: int) -> int:
    """One RGB frame reduced by ``factor`` in Pillow's storage (4 bytes a pixel)."""
    return -(-width // factor) * -(-height // factor) * 4


def _frames_room(width: int, height: int, budget: int) -> int:
    """Bytes the kept frames may take: the budget less the decoder's working frames,
    reserved at their estimate but at most at half the budget (a frame whose decoding
    needs more is decoded alone, as a huge image is)."""
    return budget - min(_DECODE_BYTES_PER_PIXEL * width * height, budget // 2)


def _fit_factor(size: tuple[int, int], n: int, target_size: int | None, budget: int | None) -> int:
    """The integer factor ``n`` frames of ``size`` (square pixels) are reduced by: the
    huge-image rule's, or the smallest larger one whose frames fit the budget, down to a
    shorter side of ``target_size`` (module docstring). ValueError naming ``n`` and the
    most that fit when none does."""
    width, height = size
    factor = _reduction_factor(size, target_size)
    if budget is None:
        return factor
    room = _frames_room(width, height, budget)
    floor = max(factor, min(size) // target_size) if target_size is not None else factor
    for f in range(factor, floor + 1):
        if n * _frame_bytes(width, height, f) <= room:
            return f
    smallest = _frame_bytes(width, height, floor)
    if target_size is None:
        how = "(frames are not reduced without target_size)"
    elif floor == 1:
        how = f"at full size (reduced, they would be smaller than the views' {target_size} px)"
    else:
        reduced = f"{-(-width // floor)}x{-(-height // floor)}"
        how = f"even reduced to {reduced} (the views' {target_size} px on the shorter side)"
    raise ValueError(
        f"--frames {n}: {n} frames of {width}x{height} do not fit the "
        f"{_fmt_bytes(budget)} pixel budget {how}; at most {room // smallest} "
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
    _check_count(n)
    if target_size is None or pixel_budget is None:
        return
    room = _frames_room(target_size, target_size, pixel_budget)
    smallest = _frame_bytes(target_size, target_size, 1)
    if n * smallest > room:
        raise ValueError(
            f"--frames {n}: that many frames cannot fit the {_fmt_bytes(pixel_budget)} "
            f"pixel budget: frames are kept at least at the model's input size "
            f"({target_size}x{target_size} px, {_fmt_bytes(smallest)} each), so at most "
            f"{room // smallest} fit"
        )


def decode_frames(
    path: str | os.PathLike,
    n: int = DEFAULT_FRAMES,
    *,
    target_size: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    pixel_budget: int | None = DEFAULT_PIXEL_BUDGET,
) -> VideoFrames:
    """Decode ``n`` frames sampled uniformly over the video at ``path`` (module docstring).

    ``target_size``: the views' size R, so that enormous frames come back reduced (None:
    never reduced). ``pixel_budget``: bytes the kept frames and the decoder's working
    frames may hold (None: no limit); frames that do not fit are reduced, down to R on
    the shorter side (module docstring). Raises :class:`ImageDecodeError` (path, reason)
    for anything that is not a readable video, or whose ``n`` frames cannot fit.
    """
    opened = open_video(
        path, n, target_size=target_size, max_pixels=max_pixels, pixel_budget=pixel_budget
    )
    try:
        return opened.read()
    finally:
        opened.close()


def _import_av(path: Path):
    try:
        import av
    except ImportError:
        raise ImageDecodeError(path, INSTALL_HINT) from None
    return av


def open_video(
    path: str | os.PathLike,
    n: int = DEFAULT_FRAMES,
    *,
    target_size: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    pixel_budget: int | None = DEFAULT_PIXEL_BUDGET,
) -> OpenedVideo:
    """Open a video and read its header (no frame decoded): what ``decode_images``
    plans with. Raises :class:`ImageDecodeError` for a file that is not a usable video
    (or whose ``n`` frames cannot fit ``pixel_budget``, see :func:`decode_frames`)."""
    path = Path(path)
    _check_count(n)
    _check_target_size(target_size)
    if max_pixels is not None and max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive or None, got {max_pixels}")
    if pixel_budget is not None and pixel_budget <= 0:
        raise ValueError(f"pixel_budget must be positive or None, got {pixel_budget}")
    check_input_file(path, "a video file")
    av = _import_av(path)
    try:
        container = av.open(os.fspath(path), metadata_errors="ignore")
    except av.error.PermissionError:
        raise ImageDecodeError(path, "permission denied") from None
    except av.error.EOFError:  # the header ends before any stream data
        raise ImageDecodeError(path, "no frames (the file ends after its header)") from None
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise ImageDecodeError(path, f"not a video or corrupt ({_av_detail(exc)})") from None
    try:
        return OpenedVideo(path, container, n, target_size, max_pixels, av, pixel_budget)
    except BaseException:
        container.close()
        raise


class OpenedVideo:
    """A video whose header is read: its stream, duration and decode cost; frames not
    yet decoded. :meth:`read` decodes the sampled frames, :meth:`close` frees the file."""

    def __init__(
        self, path: Path, container, n: int, target_size, max_pixels, av, pixel_budget=None
    ):
        self.path, self.container, self.n = path, container, n
        self.target_size, self._av, self.pixel_budget = target_size, av, pixel_budget
        videos = list(container.streams.video)
        if not videos:
            kinds = sorted({s.type for s in container.streams})
            what = (
                "; audio only" if kinds == ["audio"] else (f"; {', '.join(kinds)}" if kinds else "")
            )
            raise ImageDecodeError(path, f"not a video (no video stream{what})")
        self.stream = _main_stream(videos)
        if self.stream.codec_context is None:
            raise ImageDecodeError(
                path,
                f"unsupported codec {_codec_description(container)}: no decoder in PyAV's FFmpeg",
            )
        ctx = self.stream.codec_context
        self.codec = ctx.name
        width, height = ctx.width, ctx.height
        if width <= 0 or height <= 0:
            if self.stream.frames == 0 and self.stream.duration in (None, 0):
                raise ImageDecodeError(path, "no frames")
            raise ImageDecodeError(path, f"corrupt video (frame size {width}x{height})")
        if max_pixels is not None and width * height > max_pixels:
            raise ImageDecodeError(
                path,
                f"video frames too large: {width}x{height} = {_fmt_pixels(width * height)} "
                f"exceeds limit {_fmt_pixels(max_pixels)}",
            )
        self.width, self.height = width, height
        sar = self.stream.sample_aspect_ratio
        self.sar = Fraction(sar) if sar and sar > 0 else Fraction(1)  # pixel width / height
        self.time_base: Fraction = self.stream.time_base or Fraction(1, 1)
        start = self.stream.start_time
        if start is None and container.start_time is not None:
            start = round(container.start_time / av.time_base / self.time_base)
        self.start_pts = int(start or 0)
        self.cost = self._cost()

    def _display_size(self, width: int, height: int) -> tuple[int, int]:
        """Square pixels: the stored size stretched by the sample aspect ratio."""
        if self.sar > 1:
            return round(width * self.sar), height
        if self.sar < 1:
            return width, round(height / self.sar)
        return width, height

    def _factor(self, size: tuple[int, int]) -> int:
        """The factor frames of ``size`` (square pixels) are reduced by (module
        docstring); ImageDecodeError when ``n`` of them cannot fit the pixel budget."""
        try:
            return _fit_factor(size, self.n, self.target_size, self.pixel_budget)
        except ValueError as exc:
            raise ImageDecodeError(self.path, str(exc)) from None

    def _cost(self) -> int:
        """Bytes of pixels decoding holds at its peak, estimated (module constants)."""
        width, height = self._display_size(self.width, self.height)
        out = _frame_bytes(width, height, self._factor((width, height)))
        return self.n * out + _DECODE_BYTES_PER_PIXEL * width * height

    def close(self) -> None:
        self.container.close()

    # -- duration ---------------------------------------------------------------------

    def duration(self) -> tuple[float, bool]:
        """Seconds of video (module docstring: where it comes from), and whether they are
        the video stream's own (else the container's, which other streams may outlast)."""
        s, c = self.stream, self.container
        if s.duration and s.duration > 0:
            return float(s.duration * self.time_base), True
        tagged = _tag_seconds(s.metadata)  # Matroska / WebM keep it as a tag per stream
        if tagged:
            return tagged, True
        rate = s.average_rate or s.guessed_rate
        if s.frames and s.frames > 0 and rate:
            return float(s.frames / rate), True
        if c.duration and c.duration > 0:
            return c.duration / self._av.time_base, False
        return self._measured_duration(), True

    def _measured_duration(self) -> float:
        """The end of the last packet, read from the last keyframe on (no decoding)."""
        av, s = self._av, self.stream
        end = None
        try:  # far past the end: the demuxer lands on the last keyframe it knows
            self.container.seek(self.start_pts + int(_FAR_S / self.time_base), stream=s)
            end = _last_packet_end(self.container, s)
        except av.error.FFmpegError:
            pass
        if end is None:  # no index to seek with: read every packet once
            try:
                self.container.seek(0)
            except av.error.FFmpegError:
                return 0.0  # nothing to seek in (no packets): "no frames" follows
            end = _last_packet_end(self.container, s)
        if end is None:
            return 0.0
        return max(0.0, float((end - self.start_pts) * self.time_base))

    # -- frames -----------------------------------------------------------------------

    def read(self) -> VideoFrames:
        """Decode the sampled frames; ImageDecodeError for a video that cannot give them."""
        av = self._av
        try:
            return self._read()
        except ImageDecodeError:
            raise
        except MemoryError:
            raise ImageDecodeError(self.path, "out of memory decoding this video") from None
        except av.error.FFmpegError as exc:
            raise ImageDecodeError(
                self.path, f"truncated or corrupt video ({_av_detail(exc)})"
            ) from None

    def _read(self) -> VideoFrames:
        duration, own = self.duration()
        # A container's duration may be another stream's (sound running on after the
        # picture): then frames that end early are the video's real end, not truncation.
        strict = own or len(self.container.streams) == 1
        try:
            return self._sample(duration, strict)
        except _EndsEarly as early:
            return self._sample(early.end, True)

    def _sample(self, duration: float, strict: bool) -> VideoFrames:
        times = sample_times(duration, self.n)
        start_s = float(self.start_pts * self.time_base)
        decoder = _Decoder(self.container, self.stream)
        current = None  # (time, frame): the frame shown at the latest sample
        frames: list[Image.Image] = []
        shown: list[float] = []
        held = None  # (frame, its RGB image): a frame shown at consecutive samples
        for t in times:
            target = start_s + t
            if (current is None or current[0] < target - _EPS_S) and not decoder.exhausted:
                # Onwards from the last frame when the sample is within one keyframe
                # interval ahead (a seek would land no further); else seek.
                near = current is not None and target - current[0] <= max(_FORWARD_S, decoder.gop)
                if not (near and decoder.live):
                    decoder.seek(target)
                found = decoder.forward(target)
                if found is not None:
                    current = found
                if decoder.exhausted and current is not None and current[0] < target - _EPS_S:
                    self._check_complete(current, duration, start_s, strict)
            if current is None:
                break
            if held is None or held[0] is not current[1]:
                held = (current[1], self._to_rgb(current[1]))
            frames.append(held[1])
            shown.append(current[0] - start_s)
        if not frames:
            if decoder.packets == 0:
                raise ImageDecodeError(self.path, "no frames")
            raise ImageDecodeError(
                self.path,
                f"truncated or corrupt video (no frame decodes from its {decoder.packets} "
                "packet(s))",
            )
        return VideoFrames(
            tuple(frames),
            tuple(shown),
            tuple(times),
            duration,
            self.codec,
            decoder.decoded,
            decoder.seeks,
            str(self.path),
        )

    def _check_complete(self, current, duration: float, start_s: float, strict: bool) -> None:
        """Truncated: the frames end before the last sample's segment begins."""
        time, frame = current
        length = float(frame.duration * self.time_base) if frame.duration else 0.0
        end = time + length - start_s
        if self.n > 1 and end < duration * (self.n - 1) / self.n - _EPS_S:
            if not strict:
                raise _EndsEarly(end)
            raise ImageDecodeError(
                self.path,
                f"truncated or corrupt video (its frames end at {end:.2f} s of the "
                f"{duration:.2f} s its header states)",
            )

    def _to_rgb(self, frame) -> Image.Image:
        image = frame.to_image()  # RGB at the stored size
        size = self._display_size(*image.size)
        if size != image.size:  # anamorphic (DVD, broadcast): as a player shows it
            image = image.resize(size, Image.Resampling.BICUBIC)
        transpose = _ROTATIONS.get(round((frame.rotation or 0) / 90) % 4)
        if transpose is not None:
            image = image.transpose(transpose)
        factor = self._factor(image.size)  # per frame: a stream may change size
        return image.reduce(factor) if factor > 1 else image


class _EndsEarly(Exception):
    """The video's frames end before a duration that was not its own said (``end``, s)."""

    def __init__(self, end: float):
        super().__init__(end)
        self.end = end


_TAG_TIME = re.compile(r"\s*(\d+):(\d{1,2}):(\d{1,2}(?:\.\d+)?)\s*")


def _tag_seconds(metadata) -> float | None:
    """A stream's ``DURATION`` tag (``HH:MM:SS.fffffffff``) in seconds, else None."""
    text = next((v for k, v in (metadata or {}).items() if k.upper() == "DURATION"), None)
    match = _TAG_TIME.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        return None
    hours, minutes, seconds = match.groups()
    value = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    return value if value > 0 else None


# A display rotation of k * 90 degrees counter-clockwise -> the transpose that shows it.
_ROTATIONS = {
    1: Image.Transpose.ROTATE_90,
    2: Image.Transpose.ROTATE_180,
    3: Image.Transpose.ROTATE_270,
}


class _Decoder:
    """Packets -> frames of one stream, with seeking and counts."""

    def __init__(self, container, stream):
        self.container, self.stream = container, stream
        self.tb = stream.time_base or Fraction(1, 1)
        rate = stream.average_rate or stream.guessed_rate
        self.step = float(1 / rate) if rate else 0.0  # for frames without a timestamp
        self._frames: Iterator[tuple[float, Any]] | None = None
        self.exhausted = False
        self.seekable = True
        self.decoded = self.packets = self.seeks = 0
        self.gop = 0.0  # the longest keyframe interval seen (or seek distance), seconds
        self._last_key: float | None = None
        self._last_time: float | None = None
        self._landing: float | None = None  # the target of the seek just made

    @property
    def live(self) -> bool:
        return self._frames is not None and not self.exhausted

    def seek(self, target: float) -> None:
        """To the keyframe at or before ``target`` (seconds). A stream that cannot seek
        is decoded onwards from where it is (the start, at first)."""
        import av

        if self.seekable:
            try:
                self.container.seek(int(target / self.tb), stream=self.stream, backward=True)
            except av.error.FFmpegError:
                self.seekable = False
            else:
                self._close()
                self.seeks += 1
                self.exhausted = False
                self._last_key = None
                self._landing = target
        if self._frames is None:
            self._frames = self._iterate()

    def forward(self, target: float) -> tuple[float, Any] | None:
        """Decode to the first frame at or after ``target`` (seconds); at the end of the
        stream, the last frame decoded (None when there was none)."""
        if self._frames is None:
            self.seek(target)
        last = None
        for time, frame in self._frames:
            last = (time, frame)
            if time >= target - _EPS_S:
                return last
        self.exhausted = True
        return last

    def _iterate(self) -> Iterator[tuple[float, Any]]:
        for packet in self.container.demux(self.stream):
            if packet.size:
                self.packets += 1
            for frame in packet.decode():
                self.decoded += 1
                time = self._time(frame)
                if self._landing is not None:  # how far back the seek landed
                    self.gop = max(self.gop, self._landing - time)
                    self._landing = None
                if frame.key_frame:
                    if self._last_key is not None:
                        self.gop = max(self.gop, time - self._last_key)
                    self._last_key = time
                yield time, frame

    def _time(self, frame) -> float:
        if frame.pts is not None:
            time = float(frame.pts * self.tb)
        elif self._last_time is not None:
            time = self._last_time + self.step
        else:
            time = 0.0
        self._last_time = time
        return time

    def _close(self) -> None:
        if self._frames is not None:
            self._frames.close()
            self._frames = None


def _last_packet_end(container, stream) -> int | None:
    """The largest pts + duration of the packets from here on (None: no packet)."""
    end = None
    for packet in container.demux(stream):
        if packet.pts is not None:
            stop = packet.pts + (packet.duration or 0)
            end = stop if end is None else max(end, stop)
    return end


def _main_stream(videos: list) -> Any:
    """The stream a player shows: not a cover picture, the largest of the rest."""
    moving = [s for s in videos if not _is_attached_picture(s)] or videos
    return max(moving, key=lambda s: (s.codec_context is not None, _area(s), -s.index))


def _is_attached_picture(stream) -> bool:
    from av.stream import Disposition

    return bool(stream.disposition & Disposition.attached_pic)


def _area(stream) -> int:
    ctx = stream.codec_context
    return ctx.width * ctx.height if ctx is not None else 0


def _codec_description(container) -> str:
    """What FFmpeg calls the video stream it has no decoder for, e.g.
    ``none (ZQZQ / 0x515A515A)`` (codec, then the file's four-character code). Read from ``av_dump_format``'s log lines, which PyAV
    only passes on while logging is on: it is turned on for that one call, with every
    thread's lines captured meanwhile (so none reach the terminal)."""
    import av.logging

    text = ""
    with _LOG_LOCK, av.logging.Capture(local=False):
        old = av.logging.get_level()
        av.logging.set_level(av.logging.INFO)
        try:
            text = container.dumps_format()
        except Exception:
            text = ""
        finally:
            av.logging.set_level(old)
    match = re.search(r"Video: ([^,\n]+)", text)
    return match.group(1).strip() if match else "(unknown)"


def _av_detail(exc: BaseException) -> str:
    """An FFmpeg error's message without the file name PyAV appends."""
    text = getattr(exc, "strerror", None) or str(exc)
    return _detail(Exception(text))
