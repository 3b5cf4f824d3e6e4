"""The inputs package's shared vocabulary: what an input is, what decoding gives back,
the errors and limits every decoder uses. Imports nothing else from the package.

Axes: none (records and limits); sizes are (width, height) as Pillow gives them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)

# Pillow's default error threshold: 2 * MAX_IMAGE_PIXELS = 2 * (1 GiB / 4 bytes / 3).
DEFAULT_MAX_PIXELS: int = 2 * (1024 * 1024 * 1024 // 4 // 3)  # 178_956_970

# Reduce an image only while its shorter side stays >= REDUCE_MARGIN * R: the smallest
# random crop (8% of the area, aspect 3/4) then still spans ~4 R pixels, so every view is
# downsampled at least 4x and the reduction is invisible in it; ordinary photos are never
# reduced (that needs a shorter side >= 2 * 16 * 224 = 7168 px at R = 224).
REDUCE_MARGIN: int = 16

# Decoded pixels decode_images holds at once: two 24-Mpx photos decoding while a few more
# wait for the consumer fit; a 144-Mpx image (576 MB decoded) exceeds it and decodes alone.
DEFAULT_PIXEL_BUDGET: int = 512 * 1024 * 1024

VIDEO_EXTENSIONS: frozenset[str] = frozenset({".mp4", ".avi", ".mkv", ".webm", ".mov"})

# Frames sampled per video: 8, a common test-time clip length of CLIP video models
# (X-CLIP's and ActionCLIP's 8-frame settings); each becomes a view (of 51 by default).
DEFAULT_FRAMES: int = 8

# The longest exception text a reason quotes.
MAX_DETAIL = 160


class ImageDecodeError(Exception):
    """An image that could not be read: ``path`` and a short human ``reason``."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(str(path), reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class DecodedImage:
    """One input's outcome: exactly one of ``image`` (RGB) and ``error`` (a reason) is set.

    For a video (``decode_images(frames=N)``) ``image`` is its
    :class:`~awt_engine.inputs.frames.VideoFrames` (:attr:`is_video`).
    """

    path: str
    image: Any  # Image.Image, or VideoFrames for a video; None with an error
    error: str | None

    def __post_init__(self) -> None:
        if (self.image is None) == (self.error is None):
            raise ValueError("DecodedImage needs exactly one of image and error")

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def is_video(self) -> bool:
        return self.image is not None and not isinstance(self.image, Image.Image)


@dataclass(frozen=True)
class EncodedImage:
    """An image file's bytes, named as the file they came from (object storage, an
    archive, Ray Data's ``read_binary_files``): decoded exactly as that file would be
    (the same header checks, reduced decoding and orientation), errors naming ``name``."""

    name: str
    data: bytes

    @property
    def filename(self) -> str:
        return self.name


def input_label(index: int, item: Any) -> str:
    """The name input ``index`` is reported under: its path, a PIL image's or
    :class:`EncodedImage`'s file name, else ``<input index>``."""
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    return getattr(item, "filename", "") or f"<input {index}>"


def is_video_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a video by its extension (any case)."""
    return os.path.splitext(os.fspath(path))[1].lower() in VIDEO_EXTENSIONS


def check_input_file(path: Path, kind: str) -> None:
    """Raise :class:`ImageDecodeError` naming ``path`` unless it is a non-empty readable
    file (``kind`` names what was expected, e.g. "an image file")."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot read file ({short_detail(exc)})") from None
    if path.is_dir():
        raise ImageDecodeError(path, f"is a folder, not {kind}")
    if size == 0:
        raise ImageDecodeError(path, "empty file")


def short_detail(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."


def fmt_pixels(n: int) -> str:
    return f"{n // 1_000_000} Mpx" if n >= 10_000_000 else f"{n:,} px"


def check_target_size(target_size: int | None) -> None:
    if target_size is not None and (
        isinstance(target_size, bool) or not isinstance(target_size, int) or target_size < 1
    ):
        raise ValueError(
            f"target_size must be a positive number of pixels or None, got {target_size!r}"
        )


def reduction_factor(size: tuple[int, int], target_size: int | None) -> int:
    """The integer factor an image of ``size`` is reduced by for views of ``target_size``."""
    if target_size is None:
        return 1
    factor = min(size) // (REDUCE_MARGIN * target_size)
    return factor if factor >= 2 else 1


# Pillow's storage per pixel: 1 byte for 1/L/P, 2 for 16-bit grey, 4 for the rest (RGB too).
def bytes_per_pixel(mode: str) -> int:
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def image_bytes(im: Any) -> int:
    if not isinstance(im, Image.Image):  # a video's frames
        return im.nbytes
    return im.width * im.height * bytes_per_pixel(im.mode)


def exception_reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {short_detail(exc)}"
