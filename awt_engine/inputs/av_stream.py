"""One video stream through PyAV: choosing the stream a player shows, its duration tag,
decoding packets to frames with seeks, and FFmpeg's error texts. PyAV is imported only
inside the functions that need it (it is the optional extra ``video``).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

from awt_engine.inputs.base import short_detail

# Two timestamps closer than this are the same instant (float rounding of pts * time base).
EPS_S = 1e-6

_LOG_LOCK = threading.Lock()

_TAG_TIME = re.compile(r"\s*(\d+):(\d{1,2}):(\d{1,2}(?:\.\d+)?)\s*")


def tag_seconds(metadata) -> float | None:
    """A stream's ``DURATION`` tag (``HH:MM:SS.fffffffff``) in seconds, else None."""
    text = next((v for k, v in (metadata or {}).items() if k.upper() == "DURATION"), None)
    match = _TAG_TIME.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        return None
    hours, minutes, seconds = match.groups()
    value = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    return value if value > 0 else None


class StreamDecoder:
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
            if time >= target - EPS_S:
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


def last_packet_end(container, stream) -> int | None:
    """The largest pts + duration of the packets from here on (None: no packet)."""
    end = None
    for packet in container.demux(stream):
        if packet.pts is not None:
            stop = packet.pts + (packet.duration or 0)
            end = stop if end is None else max(end, stop)
    return end


def main_stream(videos: list) -> Any:
    """The stream a player shows: not a cover picture, the largest of the rest."""
    moving = [s for s in videos if not _is_attached_picture(s)] or videos
    return max(moving, key=lambda s: (s.codec_context is not None, _area(s), -s.index))


def _is_attached_picture(stream) -> bool:
    from av.stream import Disposition

    return bool(stream.disposition & Disposition.attached_pic)


def _area(stream) -> int:
    ctx = stream.codec_context
    return ctx.width * ctx.height if ctx is not None else 0


def codec_description(container) -> str:
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


def av_detail(exc: BaseException) -> str:
    """An FFmpeg error's message without the file name PyAV appends."""
    text = getattr(exc, "strerror", None) or str(exc)
    return short_detail(Exception(text))
