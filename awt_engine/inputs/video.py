"""Video files as inputs: a few frames sampled over the clip, decoded by seeking.

A video is classified from ``n`` frames (``ViewConfig.frames``, default 8) sampled
uniformly over its duration: frame k is the first frame at or after
:func:`sample_times`' time k, the centre of the k-th of n equal segments of the clip.
Its views are made from those frames (:func:`awt_engine.inputs.views.make_video_views`); the
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
  (:mod:`awt_engine.inputs.pil`): a frame whose shorter side is at least 32 R is reduced
  by an integer factor. A frame larger than ``max_pixels`` is refused.
* **Memory: the pixel budget** (:mod:`awt_engine.inputs.frames`): the n frames must fit
  ``pixel_budget`` beside the decoder's working frames; they are reduced when they must
  be, down to R on the shorter side, and a count that cannot fit is refused.
* **Errors** are :class:`~awt_engine.inputs.base.ImageDecodeError` (the path and a reason):
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
from fractions import Fraction
from pathlib import Path

from PIL import Image

from awt_engine.inputs.av_stream import (
    EPS_S,
    StreamDecoder,
    av_detail,
    codec_description,
    last_packet_end,
    main_stream,
    tag_seconds,
)
from awt_engine.inputs.base import (
    DEFAULT_FRAMES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_PIXEL_BUDGET,
    ImageDecodeError,
    check_input_file,
    check_target_size,
    fmt_pixels,
)
from awt_engine.inputs.frames import (
    DECODE_BYTES_PER_PIXEL,
    VideoFrames,
    check_count,
    fit_factor,
    frame_bytes,
    sample_times,
)

INSTALL_HINT = "video files need PyAV: uv sync --extra video (or pip install 'awt-engine[video]')"

# Decode forward (rather than seek) to a sample at most this far ahead when no longer
# keyframe interval has been seen: a seek could land no further ahead than that.
_FORWARD_S = 1.0
# Seek this far past a stream's start to find its last keyframe (about 115 days).
_FAR_S = 10_000_000


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
    check_count(n)
    check_target_size(target_size)
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
        raise ImageDecodeError(path, f"not a video or corrupt ({av_detail(exc)})") from None
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
        self.stream = main_stream(videos)
        if self.stream.codec_context is None:
            raise ImageDecodeError(
                path,
                f"unsupported codec {codec_description(container)}: no decoder in PyAV's FFmpeg",
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
                f"video frames too large: {width}x{height} = {fmt_pixels(width * height)} "
                f"exceeds limit {fmt_pixels(max_pixels)}",
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
            return fit_factor(size, self.n, self.target_size, self.pixel_budget)
        except ValueError as exc:
            raise ImageDecodeError(self.path, str(exc)) from None

    def _cost(self) -> int:
        """Bytes of pixels decoding holds at its peak, estimated (module constants)."""
        width, height = self._display_size(self.width, self.height)
        out = frame_bytes(width, height, self._factor((width, height)))
        return self.n * out + DECODE_BYTES_PER_PIXEL * width * height

    def close(self) -> None:
        self.container.close()

    # -- duration ---------------------------------------------------------------------

    def duration(self) -> tuple[float, bool]:
        """Seconds of video (module docstring: where it comes from), and whether they are
        the video stream's own (else the container's, which other streams may outlast)."""
        s, c = self.stream, self.container
        if s.duration and s.duration > 0:
            return float(s.duration * self.time_base), True
        tagged = tag_seconds(s.metadata)  # Matroska / WebM keep it as a tag per stream
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
            end = last_packet_end(self.container, s)
        except av.error.FFmpegError:
            pass
        if end is None:  # no index to seek with: read every packet once
            try:
                self.container.seek(0)
            except av.error.FFmpegError:
                return 0.0  # nothing to seek in (no packets): "no frames" follows
            end = last_packet_end(self.container, s)
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
                self.path, f"truncated or corrupt video ({av_detail(exc)})"
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
        decoder = StreamDecoder(self.container, self.stream)
        current = None  # (time, frame): the frame shown at the latest sample
        frames: list[Image.Image] = []
        shown: list[float] = []
        held = None  # (frame, its RGB image): a frame shown at consecutive samples
        for t in times:
            target = start_s + t
            if (current is None or current[0] < target - EPS_S) and not decoder.exhausted:
                # Onwards from the last frame when the sample is within one keyframe
                # interval ahead (a seek would land no further); else seek.
                near = current is not None and target - current[0] <= max(_FORWARD_S, decoder.gop)
                if not (near and decoder.live):
                    decoder.seek(target)
                found = decoder.forward(target)
                if found is not None:
                    current = found
                if decoder.exhausted and current is not None and current[0] < target - EPS_S:
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
        if self.n > 1 and end < duration * (self.n - 1) / self.n - EPS_S:
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


# A display rotation of k * 90 degrees counter-clockwise -> the transpose that shows it.
_ROTATIONS = {
    1: Image.Transpose.ROTATE_90,
    2: Image.Transpose.ROTATE_180,
    3: Image.Transpose.ROTATE_270,
}
