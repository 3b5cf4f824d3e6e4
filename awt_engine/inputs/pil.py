"""Decoding one image file (or its bytes) with Pillow, robustly.

Every readable image comes back as RGB with its EXIF orientation applied; every
unreadable one raises :class:`~awt_engine.inputs.base.ImageDecodeError` with its path and
a short reason.

Conversion rules (``to_rgb``):

* palette / grey / RGB images with transparency, and RGBA / LA / PA: composited onto
  white (transparent areas read as white paper, not as black);
* 16-bit and 32-bit integer grey ("I;16*", "I"): the 0-65535 range scaled to 0-255
  (65535 -> 255, 32768 -> 128), never clipped at 255;
* float grey ("F"): values in [0, 1] scaled by 255, other ranges stretched min..max;
* CMYK, YCbCr, 1-bit, grey and the rest: Pillow's ``convert("RGB")``.

Decompression bombs: an image whose header declares more than ``max_pixels`` pixels
(default :data:`DEFAULT_MAX_PIXELS`, Pillow's own error threshold, about 179 Mpx) is
refused before any pixel is decoded, with a reason naming its size and the limit.
``max_pixels`` alone is the policy (``None``: no limit). Pillow's global
``PIL.Image.MAX_IMAGE_PIXELS`` guard is never left changed: when it refuses a header that
``max_pixels`` allows, the header is parsed again with the guard lifted for that one
``Image.open`` (under a lock, restored at once) and decoded afterwards. Formats that check
again while decoding (GIF frames, TIFF tiles) may still be refused by Pillow.

Truncated files are errors: this module never sets ``ImageFile.LOAD_TRUNCATED_IMAGES``
(if a caller sets it, Pillow's behaviour follows their choice).

Huge images (``target_size``): the views are made at the model's input size R (view 0 is
the shorter side resized to R, the random crops cover at least 8% of the area), so an image
whose shorter side is at least ``2 * REDUCE_MARGIN * R`` (7168 px for R = 224) is reduced
by the integer factor ``f = shorter // (REDUCE_MARGIN * R)``, which keeps its shorter side
between ``REDUCE_MARGIN * R`` and 1.5 times that: even the smallest crop still has about
4 R pixels on a side. JPEG (and MPO) files are decoded reduced by the largest of 1/2, 1/4,
1/8 not beyond ``f`` (libjpeg's DCT scaling, ``Image.draft``, no full-size decode), the
rest of the factor, and every other format, by ``Image.reduce`` (a box filter) after
decoding. Ordinary photos (up to ~68 Mpx at 4:3 for R = 224) are never touched. The rule
depends only on the image and R, so results never depend on batch or order; reducing an
already reduced image changes nothing. PIL images and arrays passed in are reduced by
``Image.reduce`` alone (a PIL JPEG already opened by the caller is not re-decoded), so
their pixels can differ slightly from the same JPEG file's. ``target_size=None`` (the
default of :func:`load_image` and friends) never reduces.
"""

from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from awt_engine.inputs.base import (
    DEFAULT_MAX_PIXELS,
    EncodedImage,
    ImageDecodeError,
    bytes_per_pixel,
    check_input_file,
    check_target_size,
    fmt_pixels,
    reduction_factor,
    short_detail,
)

_WHITE = (255, 255, 255, 255)
_PIL_LIMIT_LOCK = threading.Lock()
_ORIENTATION_TAG = 0x0112


def load_image(
    path: str | os.PathLike | EncodedImage,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    target_size: int | None = None,
) -> Image.Image:
    """Decode one image file (or an :class:`EncodedImage`'s bytes) to a fully loaded RGB
    image with EXIF orientation applied.

    ``target_size``: the size R of the views the image is for; a huge image is decoded
    reduced (see the module docstring). None: full size.

    Raises :class:`ImageDecodeError` (path, short reason) for anything unreadable: a
    missing or empty file, a file that is not an image, a truncated or corrupt one, or
    one larger than ``max_pixels`` (checked on the header, before decoding).
    """
    if max_pixels is not None and max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive or None, got {max_pixels}")
    check_target_size(target_size)
    return decode_opened(open_for_decode(path, max_pixels, target_size), target_size)


@dataclass
class _Opened:
    """A file whose header is read (and decoder configured), pixels not yet decoded."""

    path: Path
    im: Image.Image
    fmt: str
    cost: int  # bytes of pixels held while decoding it (see _decode_cost)


def open_for_decode(
    path: str | os.PathLike | EncodedImage, max_pixels: int | None, target_size: int | None
) -> _Opened:
    source = path
    if isinstance(source, EncodedImage):
        path = Path(source.name)
        if not source.data:
            raise ImageDecodeError(path, "empty file")
    else:
        path = Path(path)
        check_input_file(path, "an image file")
        source = path

    fmt = path.suffix.lstrip(".").upper() or "image"

    def open_():
        if isinstance(source, EncodedImage):
            return Image.open(io.BytesIO(source.data))
        return Image.open(source)

    try:
        try:
            im = open_()
        except Image.DecompressionBombError:
            # Pillow's global guard refused the header. Parse the header again with the
            # guard lifted (nothing is decoded here) so that max_pixels decides, and the
            # reason can name the declared size.
            with _PIL_LIMIT_LOCK, _pillow_guard_lifted():
                im = open_()
    except Exception as exc:
        raise _decode_error(path, fmt, exc) from None
    try:
        fmt = im.format or fmt
        _check_pixels(path, im, max_pixels)
        _draft(im, target_size)
        return _Opened(path, im, fmt, _decode_cost(im, target_size))
    except Exception as exc:
        im.close()
        raise _decode_error(path, fmt, exc) from None


def decode_opened(opened: _Opened, target_size: int | None) -> Image.Image:
    """Decode the pixels (closing the file, whatever happens)."""
    try:
        with opened.im as im:
            im.load()
            return finish(im, target_size)
    except Exception as exc:
        raise _decode_error(opened.path, opened.fmt, exc) from None
    finally:
        opened.im.close()


def _decode_error(path: Path, fmt: str, exc: BaseException) -> ImageDecodeError:
    """The short reason for an exception raised while opening or decoding ``path``."""
    if isinstance(exc, ImageDecodeError):
        return exc
    if isinstance(exc, UnidentifiedImageError):
        return ImageDecodeError(path, "not an image (cannot identify format)")
    if isinstance(exc, Image.DecompressionBombError):  # e.g. a later GIF frame or TIFF tile
        return ImageDecodeError(path, f"image too large ({short_detail(exc)})")
    if isinstance(exc, PermissionError):
        return ImageDecodeError(path, "permission denied")
    if isinstance(exc, MemoryError):
        return ImageDecodeError(path, f"out of memory decoding this {fmt}")
    if isinstance(exc, _UnsupportedModeError):
        return ImageDecodeError(path, str(exc))
    # OSError, SyntaxError, EOFError, ValueError, struct.error, ...
    return ImageDecodeError(path, f"truncated or corrupt {fmt} ({short_detail(exc)})")


def _draft(im: Image.Image, target_size: int | None) -> None:
    """Let JPEG decode at 1/2, 1/4 or 1/8 scale, never beyond the reduction factor."""
    factor = reduction_factor(im.size, target_size)
    scale = next(s for s in (8, 4, 2, 1) if s <= factor)
    if scale > 1:
        # Pillow picks the largest scale whose result is >= the requested size: asking
        # for (w // scale, h // scale) picks exactly ``scale`` (w >= scale**2 here).
        im.draft(None, (im.width // scale, im.height // scale))  # no-op for other formats


def _decode_cost(im: Image.Image, target_size: int | None) -> int:
    """Bytes of pixels decoding ``im`` holds at its peak, estimated: the decoded image,
    its RGB output and one intermediate of that size (conversion, orientation), plus a
    full-size RGB copy when the mode must be converted before it can be reduced."""
    width, height = im.size
    native = width * height * bytes_per_pixel(im.mode)
    factor = reduction_factor(im.size, target_size)
    output = -(-width // factor) * -(-height // factor) * 4
    converted_first = factor > 1 and not _reducible(im)
    return native + 2 * output + (width * height * 4 if converted_first else 0)


def _reducible(im: Image.Image) -> bool:
    """Image.reduce averages these modes correctly (alpha premultiplied); not palette
    indices, and not a transparency key colour."""
    return im.mode in ("L", "RGB", "LA", "RGBA") and "transparency" not in im.info


class _UnsupportedModeError(ValueError):
    """A pixel mode Pillow cannot convert to RGB (e.g. LAB)."""


class _pillow_guard_lifted:
    """Context: ``PIL.Image.MAX_IMAGE_PIXELS = None`` inside, the old value restored after.

    Used around a header parse only, under ``_PIL_LIMIT_LOCK`` so that two such windows
    never interleave (and the saved value is always the caller's). Decodes overlapping a
    window are still bounded: every header is checked against its own ``max_pixels``.
    """

    def __enter__(self) -> None:
        self._old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None

    def __exit__(self, *exc: object) -> None:
        Image.MAX_IMAGE_PIXELS = self._old


def _check_pixels(path: Path, im: Image.Image, max_pixels: int | None) -> None:
    width, height = im.size
    pixels = width * height
    if max_pixels is not None and pixels > max_pixels:
        raise ImageDecodeError(
            path,
            f"image too large: {width}x{height} = {fmt_pixels(pixels)} exceeds limit "
            f"{fmt_pixels(max_pixels)}",
        )


def finish(im: Image.Image, target_size: int | None = None) -> Image.Image:
    """RGB, reduced for ``target_size``, orientation applied, detached from the file."""
    transpose = _orientation(im)
    factor = reduction_factor(im.size, target_size)  # the shorter side is kept by transposes
    out = im
    if factor > 1 and _reducible(out):
        out, factor = out.reduce(factor), 1
    if transpose is not None:
        out = out.transpose(transpose)
        out.info.pop("exif", None)  # the orientation is applied: drop the tag with it
    out = to_rgb(out)
    if factor > 1:
        out = out.reduce(factor)
    if out is im:
        out = im.copy()
    return out


# EXIF orientation -> the transpose that displays the image upright (as ImageOps does).
_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(im: Image.Image) -> Image.Transpose | None:
    try:
        return _TRANSPOSES.get(im.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # unreadable EXIF: keep the pixels as stored
        return None


def to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode.startswith("I;16") or mode == "I":
        return _integer_grey_to_l(im).convert("RGB")
    if mode == "F":
        return _float_grey_to_l(im).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise _UnsupportedModeError(f"unsupported pixel mode {mode}") from exc


def _integer_grey_to_l(im: Image.Image) -> Image.Image:
    """16-bit range (0..65535) to 8-bit, rounding: v -> round(v * 255 / 65535)."""
    values = np.asarray(im).astype(np.int64)
    values = np.clip(values, 0, 65535)
    return Image.fromarray(((values + 128) // 257).astype(np.uint8))


def _float_grey_to_l(im: Image.Image) -> Image.Image:
    values = np.asarray(im, dtype=np.float64)
    finite = np.isfinite(values)
    values = np.where(finite, values, 0.0)
    if values.size and finite.any():
        lo, hi = values[finite].min(), values[finite].max()
        if lo >= 0.0 and hi <= 1.0:
            values = values * 255.0
        elif lo < 0.0 or hi > 255.0:
            values = (values - lo) * (255.0 / (hi - lo)) if hi > lo else values * 0.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
