"""Finding and decoding images, robustly.

Inputs are folders (searched recursively by extension), files (taken as given, any
extension) and glob patterns. Decoding never stops a run: every readable image comes back
as RGB with its EXIF orientation applied, every unreadable one comes back with its path
and a short reason.

Conversion rules (``_to_rgb``):

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
"""

from __future__ import annotations

import glob
import os
import re
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "DecodedImage",
    "ImageDecodeError",
    "as_rgb_image",
    "decode_images",
    "discover_images",
    "load_image",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)

# Pillow's default error threshold: 2 * MAX_IMAGE_PIXELS = 2 * (1 GiB / 4 bytes / 3).
DEFAULT_MAX_PIXELS: int = 2 * (1024 * 1024 * 1024 // 4 // 3)  # 178_956_970

_WHITE = (255, 255, 255, 255)
_GLOB_CHARS = re.compile(r"[*?\[]")
_PIL_LIMIT_LOCK = threading.Lock()
_MAX_DETAIL = 160
_ORIENTATION_TAG = 0x0112


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
    """One input's outcome: exactly one of ``image`` (RGB) and ``error`` (a reason) is set."""

    path: str
    image: Image.Image | None
    error: str | None

    def __post_init__(self) -> None:
        if (self.image is None) == (self.error is None):
            raise ValueError("DecodedImage needs exactly one of image and error")

    @property
    def ok(self) -> bool:
        return self.error is None


# --------------------------------------------------------------------------- discovery


def discover_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files named by ``inputs``, in order, without duplicates.

    * a file is taken as given, whatever its extension;
    * a folder is searched recursively for files with an extension in
      :data:`IMAGE_EXTENSIONS` (any case), sorted; names starting with "." (hidden files
      and folders, macOS "._" side files) are skipped;
    * anything else containing ``*``, ``?`` or ``[`` is a glob pattern (``**`` recursive):
      matched image files, plus the images inside matched folders, sorted.

    Raises ValueError naming every input that does not exist or matched no image.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: list[Path] = []
    seen: set[str] = set()
    problems: list[str] = []

    def add(path: Path) -> None:
        key = os.path.normcase(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            found.append(path)

    for raw in inputs:
        if not isinstance(raw, (str, os.PathLike)):
            raise TypeError(f"image input must be a path or a pattern, got {type(raw).__name__}")
        text = os.fspath(raw)
        path = Path(text).expanduser()
        if path.is_file():
            add(path)
        elif path.is_dir():
            images = _images_in_folder(path)
            if not images:
                problems.append(f"{text!r} (folder holds no {_extension_list()} files)")
            for image in images:
                add(image)
        elif _GLOB_CHARS.search(text):
            images = _images_for_glob(os.path.expanduser(text))
            if not images:
                problems.append(f"{text!r} (pattern matched no image files)")
            for image in images:
                add(image)
        elif path.exists():
            problems.append(f"{text!r} (not a regular file or folder)")
        else:
            problems.append(f"{text!r} (does not exist)")
    if problems:
        raise ValueError("no images found for: " + ", ".join(problems))
    return found


def _extension_list() -> str:
    return "/".join(sorted(IMAGE_EXTENSIONS))


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _images_in_folder(folder: Path) -> list[Path]:
    out: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and _is_image_name(name):
                out.append(Path(root, name))
    return sorted(out)


def _images_for_glob(pattern: str) -> list[Path]:
    out: list[Path] = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        path = Path(match)
        if path.is_dir():
            out.extend(_images_in_folder(path))
        elif path.is_file() and _is_image_name(path.name):
            out.append(path)
    return out


# --------------------------------------------------------------------------- decoding


def load_image(
    path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode one image file to a fully loaded RGB image with EXIF orientation applied.

    Raises :class:`ImageDecodeError` (path, short reason) for anything unreadable: a
    missing or empty file, a file that is not an image, a truncated or corrupt one, or
    one larger than ``max_pixels`` (checked on the header, before decoding).
    """
    if max_pixels is not None and max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive or None, got {max_pixels}")
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot read file ({_detail(exc)})") from None
    if path.is_dir():
        raise ImageDecodeError(path, "is a folder, not an image file")
    if size == 0:
        raise ImageDecodeError(path, "empty file")

    fmt = path.suffix.lstrip(".").upper() or "image"
    try:
        try:
            im = Image.open(path)
        except Image.DecompressionBombError:
            # Pillow's global guard refused the header. Parse the header again with the
            # guard lifted (nothing is decoded here) so that max_pixels decides, and the
            # reason can name the declared size.
            with _PIL_LIMIT_LOCK, _pillow_guard_lifted():
                im = Image.open(path)
        with im:
            fmt = im.format or fmt
            _check_pixels(path, im, max_pixels)
            im.load()
            return _finish(im)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not an image (cannot identify format)") from None
    except Image.DecompressionBombError as exc:  # e.g. a later GIF frame or TIFF tile
        raise ImageDecodeError(path, f"image too large ({_detail(exc)})") from None
    except PermissionError:
        raise ImageDecodeError(path, "permission denied") from None
    except MemoryError:
        raise ImageDecodeError(path, f"out of memory decoding this {fmt}") from None
    except _UnsupportedModeError as exc:
        raise ImageDecodeError(path, str(exc)) from None
    except Exception as exc:  # OSError, SyntaxError, EOFError, ValueError, struct.error, ...
        raise ImageDecodeError(path, f"truncated or corrupt {fmt} ({_detail(exc)})") from None


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
            f"image too large: {width}x{height} = {_fmt_pixels(pixels)} exceeds limit "
            f"{_fmt_pixels(max_pixels)}",
        )


def _fmt_pixels(n: int) -> str:
    return f"{n // 1_000_000} Mpx" if n >= 10_000_000 else f"{n:,} px"


def _detail(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


def _finish(im: Image.Image) -> Image.Image:
    """RGB, orientation applied, detached from the file."""
    oriented = im
    try:
        # exif_transpose copies the whole image even without a tag: only call it when
        # there is an orientation to apply.
        if im.getexif().get(_ORIENTATION_TAG, 1) != 1:
            oriented = ImageOps.exif_transpose(im)
    except Exception:  # unreadable EXIF: keep the pixels as stored
        oriented = im
    out = _to_rgb(oriented)
    if out is im:
        out = im.copy()
    return out


def _to_rgb(im: Image.Image) -> Image.Image:
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


# --------------------------------------------------------------------------- in-memory inputs


def as_rgb_image(obj: Any, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Any supported image input as an RGB ``PIL.Image``.

    * ``str`` / ``os.PathLike``: :func:`load_image`;
    * ``PIL.Image.Image``: loaded and converted like a file (orientation, transparency,
      16-bit) and returned as a new image;
    * ``numpy.ndarray`` of shape HxW, HxWx1, HxWx3 or HxWx4 (RGBA, composited on white):
      uint8 as is, uint16 scaled from 0..65535, bool as 0/255, float in [0, 1] scaled by 255.

    Raises TypeError naming the type for anything else, ValueError for a bad array shape.
    """
    if isinstance(obj, (str, os.PathLike)):
        return load_image(obj, max_pixels=max_pixels)
    if isinstance(obj, Image.Image):
        label = getattr(obj, "filename", "") or "<PIL image>"
        try:
            obj.load()
            return _finish(obj)
        except Exception as exc:
            raise ImageDecodeError(label, f"cannot read image ({_detail(exc)})") from None
    if isinstance(obj, np.ndarray):
        return _array_to_rgb(obj)
    raise TypeError(
        f"unsupported image input of type {type(obj).__module__}.{type(obj).__qualname__}: "
        "expected a file path, a PIL.Image.Image or a numpy array (HxW or HxWx3)"
    )


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    shape = array.shape
    if array.ndim == 3 and shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image array is empty (shape {shape})")
    if array.dtype == np.uint8:
        data = array
    elif array.dtype == np.uint16:
        data = ((array.astype(np.int64) + 128) // 257).astype(np.uint8)
    elif array.dtype == np.bool_:
        data = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise ValueError("float image arrays must hold finite values in [0, 1]")
        data = np.rint(array * 255.0).astype(np.uint8)
    else:
        raise TypeError(
            f"unsupported image array dtype {array.dtype}: use uint8, uint16, bool or float"
        )
    return _to_rgb(Image.fromarray(np.ascontiguousarray(data)))


# --------------------------------------------------------------------------- batches


def decode_images(
    paths: Iterable[Any],
    *,
    workers: int = 2,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    prefetch: int | None = None,
) -> Iterator[DecodedImage]:
    """Decode ``paths`` on a thread pool and yield one :class:`DecodedImage` per input,
    in input order.

    At most ``prefetch`` (default ``2 * workers``) images are decoded ahead of the one
    being consumed, so a large folder is never held in memory at once. ``paths`` may be
    a lazy iterable; items may also be PIL images or numpy arrays (their ``path`` then
    reads ``<input N>``). Never raises for a bad image: its ``error`` says why.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if prefetch is None:
        prefetch = 2 * workers
    if prefetch < 1:
        raise ValueError(f"prefetch must be at least 1, got {prefetch}")
    if max_pixels is not None and max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive or None, got {max_pixels}")
    return _decode_stream(enumerate(paths), workers, prefetch, max_pixels)


def _decode_stream(
    items: Iterator[tuple[int, Any]], workers: int, prefetch: int, max_pixels: int | None
) -> Iterator[DecodedImage]:
    if workers == 1:
        for index, item in items:
            yield _decode_one(index, item, max_pixels)
        return
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="awt-decode")
    pending: deque[Future[DecodedImage]] = deque()
    try:
        for index, item in items:
            pending.append(executor.submit(_decode_one, index, item, max_pixels))
            if len(pending) > prefetch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        executor.shutdown(wait=True, cancel_futures=True)


def _decode_one(index: int, item: Any, max_pixels: int | None) -> DecodedImage:
    if isinstance(item, (str, os.PathLike)):
        label = os.fspath(item)
    else:
        label = getattr(item, "filename", "") or f"<input {index}>"
    try:
        image = as_rgb_image(item, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        return DecodedImage(path=label, image=None, error=exc.reason)
    except Exception as exc:  # a bad item must not end the run
        return DecodedImage(path=label, image=None, error=f"{type(exc).__name__}: {_detail(exc)}")
    return DecodedImage(path=label, image=image, error=None)
