"""Finding and decoding images, robustly.

Inputs are folders (searched recursively by extension), files (taken as given, any
extension) and glob patterns. A folder that cannot be listed is reported with a reason
(:func:`find_images`), never skipped silently. Decoding never stops a run: every readable
image comes back as RGB with its EXIF orientation applied, every unreadable one comes back
with its path and a short reason.

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

Memory: :func:`decode_images` holds at most ``pixel_budget`` bytes of decoded pixels
(default :data:`DEFAULT_PIXEL_BUDGET`), counting each image being decoded at its full
decoded size plus twice its output size, and each decoded image not yet taken by the
consumer at its output size (Pillow's storage: 4 bytes per RGB pixel). An image larger
than the budget is decoded alone.

Videos (:data:`awt_engine.video.VIDEO_EXTENSIONS`, recognised by extension) are found in
folders and globs beside images. :func:`decode_images` decodes one only when given
``frames``: its sampled frames (:mod:`awt_engine.video`) come back as a
:class:`~awt_engine.video.VideoFrames` in ``DecodedImage.image``, counted against the
budget as all its frames plus the decoder's working frames; frames that would not fit
the budget are reduced until they do (with either number of workers), and a count that
cannot fit is refused.
"""

from __future__ import annotations

import functools
import glob
import io
import os
import re
import sys
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_PIXEL_BUDGET",
    "IMAGE_EXTENSIONS",
    "REDUCE_MARGIN",
    "DecodedImage",
    "EncodedImage",
    "FoundImages",
    "ImageDecodeError",
    "UnreadableFolder",
    "as_rgb_image",
    "decode_images",
    "discover_images",
    "find_images",
    "input_label",
    "load_image",
]

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
    """One input's outcome: exactly one of ``image`` (RGB) and ``error`` (a reason) is set.

    For a video (``decode_images(frames=N)``) ``image`` is its
    :class:`~awt_engine.video.VideoFrames` (:attr:`is_video`).
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


# --------------------------------------------------------------------------- discovery


class UnreadableFolder(NamedTuple):
    """A folder that discovery could not list: its images are unknown, not absent."""

    path: str
    reason: str


@dataclass(frozen=True)
class FoundImages:
    """What :func:`find_images` found: image files, and folders it could not read."""

    images: list[Path]
    unreadable: list[UnreadableFolder]


def discover_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files named by ``inputs``, in order, without duplicates.

    :func:`find_images`'s images; each folder it could not read is named in a
    ``UserWarning`` (use :func:`find_images` to handle them, as ``classify`` does).
    """
    found = find_images(inputs)
    for folder in found.unreadable:
        warnings.warn(f"{folder.path}: {folder.reason}; the images in it are skipped", stacklevel=2)
    return found.images


def find_images(inputs: Sequence[str | os.PathLike]) -> FoundImages:
    """The image files named by ``inputs``, in order, without duplicates, and the
    folders that could not be read (permission denied...), sorted.

    * a file is taken as given, whatever its extension;
    * a folder is searched recursively for files with an extension in
      :data:`IMAGE_EXTENSIONS` or :data:`awt_engine.video.VIDEO_EXTENSIONS` (any case:
      images and videos may be mixed), sorted; names starting with "." (hidden files
      and folders, macOS "._" side files) are skipped; a folder (or subfolder) that
      cannot be listed is reported in ``unreadable``, never skipped silently;
    * anything else containing ``*``, ``?`` or ``[`` is a glob pattern (``**`` recursive):
      matched image files, plus the images inside matched folders, sorted.

    Raises ValueError naming every input that does not exist or matched no image (a
    folder with unreadable subfolders is not "empty": they are reported instead).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: list[Path] = []
    seen: set[str] = set()
    problems: list[str] = []
    unreadable: dict[str, UnreadableFolder] = {}

    def add(path: Path) -> None:
        key = os.path.normcase(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            found.append(path)

    def note(folder: UnreadableFolder) -> None:
        unreadable.setdefault(os.path.normcase(os.path.abspath(folder.path)), folder)

    for raw in inputs:
        if not isinstance(raw, (str, os.PathLike)):
            raise TypeError(f"image input must be a path or a pattern, got {type(raw).__name__}")
        text = os.fspath(raw)
        path = Path(text).expanduser()
        if path.is_file():
            add(path)
        elif path.is_dir():
            images, locked = _images_in_folder(path)
            if not images and not locked:
                problems.append(f"{text!r} (folder holds no {_extension_list()} files)")
            for image in images:
                add(image)
            for folder in locked:
                note(folder)
        elif _GLOB_CHARS.search(text):
            images, locked = _images_for_glob(os.path.expanduser(text))
            if not images and not locked:
                problems.append(f"{text!r} (pattern matched no image files)")
            for image in images:
                add(image)
            for folder in locked:
                note(folder)
        elif path.exists():
            problems.append(f"{text!r} (not a regular file or folder)")
        else:
            problems.append(f"{text!r} (does not exist)")
    if problems:
        raise ValueError("no images found for: " + ", ".join(problems))
    return FoundImages(found, sorted(unreadable.values()))


def _extension_list() -> str:
    return "/".join(sorted(_input_extensions()))


@functools.cache
def _input_extensions() -> frozenset[str]:
    """Image and video extensions (awt_engine.video imports this module: read it late)."""
    from awt_engine.video import VIDEO_EXTENSIONS

    return IMAGE_EXTENSIONS | VIDEO_EXTENSIONS


def _is_image_name(name: str) -> bool:
    """An image's or a video's file name, by its extension."""
    return os.path.splitext(name)[1].lower() in _input_extensions()


def _images_in_folder(folder: Path) -> tuple[list[Path], list[UnreadableFolder]]:
    out: list[Path] = []
    locked: list[UnreadableFolder] = []

    def unreadable(exc: OSError) -> None:  # os.walk skips the folder after this
        where = exc.filename if exc.filename is not None else folder
        locked.append(UnreadableFolder(os.fspath(where), _listing_reason(exc)))

    for root, dirs, files in os.walk(folder, onerror=unreadable):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and _is_image_name(name):
                out.append(Path(root, name))
    return sorted(out), locked


def _listing_reason(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "cannot read folder (permission denied)"
    return f"cannot read folder ({exc.strerror or _detail(exc)})"


def _images_for_glob(pattern: str) -> tuple[list[Path], list[UnreadableFolder]]:
    out: list[Path] = []
    locked: list[UnreadableFolder] = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        path = Path(match)
        if path.is_dir():
            images, problems = _images_in_folder(path)
            out.extend(images)
            locked.extend(problems)
        elif path.is_file() and _is_image_name(path.name):
            out.append(path)
    return out, locked


# --------------------------------------------------------------------------- decoding


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
    _check_target_size(target_size)
    return _decode_opened(_open_for_decode(path, max_pixels, target_size), target_size)


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


@dataclass
class _Opened:
    """A file whose header is read (and decoder configured), pixels not yet decoded."""

    path: Path
    im: Image.Image
    fmt: str
    cost: int  # bytes of pixels held while decoding it (see _decode_cost)


def _open_for_decode(
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


def _decode_opened(opened: _Opened, target_size: int | None) -> Image.Image:
    """Decode the pixels (closing the file, whatever happens)."""
    try:
        with opened.im as im:
            im.load()
            return _finish(im, target_size)
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
        return ImageDecodeError(path, f"image too large ({_detail(exc)})")
    if isinstance(exc, PermissionError):
        return ImageDecodeError(path, "permission denied")
    if isinstance(exc, MemoryError):
        return ImageDecodeError(path, f"out of memory decoding this {fmt}")
    if isinstance(exc, _UnsupportedModeError):
        return ImageDecodeError(path, str(exc))
    # OSError, SyntaxError, EOFError, ValueError, struct.error, ...
    return ImageDecodeError(path, f"truncated or corrupt {fmt} ({_detail(exc)})")


def _check_target_size(target_size: int | None) -> None:
    if target_size is not None and (
        isinstance(target_size, bool) or not isinstance(target_size, int) or target_size < 1
    ):
        raise ValueError(
            f"target_size must be a positive number of pixels or None, got {target_size!r}"
        )


def _reduction_factor(size: tuple[int, int], target_size: int | None) -> int:
    """The integer factor an image of ``size`` is reduced by for views of ``target_size``."""
    if target_size is None:
        return 1
    factor = min(size) // (REDUCE_MARGIN * target_size)
    return factor if factor >= 2 else 1


def _draft(im: Image.Image, target_size: int | None) -> None:
    """Let JPEG decode at 1/2, 1/4 or 1/8 scale, never beyond the reduction factor."""
    factor = _reduction_factor(im.size, target_size)
    scale = next(s for s in (8, 4, 2, 1) if s <= factor)
    if scale > 1:
        # Pillow picks the largest scale whose result is >= the requested size: asking
        # for (w // scale, h // scale) picks exactly ``scale`` (w >= scale**2 here).
        im.draft(None, (im.width // scale, im.height // scale))  # no-op for other formats


# Pillow's storage per pixel: 1 byte for 1/L/P, 2 for 16-bit grey, 4 for the rest (RGB too).
def _bytes_per_pixel(mode: str) -> int:
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def _image_bytes(im: Any) -> int:
    if not isinstance(im, Image.Image):  # a video's frames
        return im.nbytes
    return im.width * im.height * _bytes_per_pixel(im.mode)


def _decode_cost(im: Image.Image, target_size: int | None) -> int:
    """Bytes of pixels decoding ``im`` holds at its peak, estimated: the decoded image,
    its RGB output and one intermediate of that size (conversion, orientation), plus a
    full-size RGB copy when the mode must be converted before it can be reduced."""
    width, height = im.size
    native = width * height * _bytes_per_pixel(im.mode)
    factor = _reduction_factor(im.size, target_size)
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
            f"image too large: {width}x{height} = {_fmt_pixels(pixels)} exceeds limit "
            f"{_fmt_pixels(max_pixels)}",
        )


def _fmt_pixels(n: int) -> str:
    return f"{n // 1_000_000} Mpx" if n >= 10_000_000 else f"{n:,} px"


def check_input_file(path: Path, kind: str) -> None:
    """Raise :class:`ImageDecodeError` naming ``path`` unless it is a non-empty readable
    file (``kind`` names what was expected, e.g. "an image file")."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot read file ({_detail(exc)})") from None
    if path.is_dir():
        raise ImageDecodeError(path, f"is a folder, not {kind}")
    if size == 0:
        raise ImageDecodeError(path, "empty file")


def _detail(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


def _finish(im: Image.Image, target_size: int | None = None) -> Image.Image:
    """RGB, reduced for ``target_size``, orientation applied, detached from the file."""
    transpose = _orientation(im)
    factor = _reduction_factor(im.size, target_size)  # the shorter side is kept by transposes
    out = im
    if factor > 1 and _reducible(out):
        out, factor = out.reduce(factor), 1
    if transpose is not None:
        out = out.transpose(transpose)
        out.info.pop("exif", None)  # the orientation is applied: drop the tag with it
    out = _to_rgb(out)
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


def as_rgb_image(
    obj: Any, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, target_size: int | None = None
) -> Image.Image:
    """Any supported image input as an RGB ``PIL.Image``.

    * ``str`` / ``os.PathLike`` / :class:`EncodedImage`: :func:`load_image`;
    * ``PIL.Image.Image``: loaded and converted like a file (orientation, transparency,
      16-bit) and returned as a new image;
    * ``numpy.ndarray`` of shape HxW, HxWx1, HxWx3 or HxWx4 (RGBA, composited on white):
      uint8 as is, uint16 scaled from 0..65535, bool as 0/255, float in [0, 1] scaled by 255;
    * ``torch.Tensor`` in torch's channel-first layout, 3xHxW (or 1xHxW, 4xHxW, HxW), with
      the same dtype rules (uint8, or float in [0, 1] as torchvision's ``ToTensor`` gives).

    ``target_size``: the views' size R; a huge image comes back reduced (module docstring).

    Raises TypeError naming the type for anything else, ValueError for a bad array shape.
    """
    _check_target_size(target_size)
    if isinstance(obj, (str, os.PathLike, EncodedImage)):
        return load_image(obj, max_pixels=max_pixels, target_size=target_size)
    if isinstance(obj, Image.Image):
        label = getattr(obj, "filename", "") or "<PIL image>"
        try:
            obj.load()
            return _finish(obj, target_size)
        except Exception as exc:
            raise ImageDecodeError(label, f"cannot read image ({_detail(exc)})") from None
    if _is_torch_tensor(obj):
        obj = _tensor_to_array(obj)
    if isinstance(obj, np.ndarray):
        image = _array_to_rgb(obj)
        factor = _reduction_factor(image.size, target_size)
        return image.reduce(factor) if factor > 1 else image
    raise TypeError(
        f"unsupported image input of type {type(obj).__module__}.{type(obj).__qualname__}: "
        "expected a file path, a PIL.Image.Image, a numpy array (HxW or HxWx3) or a torch "
        "tensor (3xHxW)"
    )


def _is_torch_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # never import torch just to ask
    return torch is not None and isinstance(obj, torch.Tensor)


def _tensor_to_array(t) -> np.ndarray:
    """A channel-first tensor (3xHxW, 1xHxW, 4xHxW or HxW) as an HxWxC numpy array."""
    t = t.detach().to("cpu")
    if t.dim() == 3 and t.shape[0] in (1, 3, 4):
        t = t.permute(1, 2, 0)
    elif t.dim() != 2:
        raise ValueError(
            f"image tensor must be 3xHxW (channels first, as torchvision uses), 1xHxW, 4xHxW "
            f"or HxW, got shape {tuple(t.shape)}"
        )
    return t.contiguous().numpy()


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
    as a :class:`~awt_engine.video.VideoFrames`, reduced when they must be to fit
    ``pixel_budget`` (ValueError at once for a count that no video could fit:
    :func:`awt_engine.video.check_frame_count`); None: videos are refused (an error
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
    _check_target_size(target_size)
    if frames is not None and (
        isinstance(frames, bool) or not isinstance(frames, int) or frames < 1
    ):
        raise ValueError(f"frames must be an integer >= 1 or None, got {frames!r}")
    if frames is not None:  # a count no video could hold is a usage error, not N error rows
        from awt_engine.video import check_frame_count

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
            held = _image_bytes(decoded.image) if decoded.ok else 0
            self.used += held - slot.reserved
            slot.reserved = held
        return decoded

    def _decoded(self, slot: _Slot, fut: Future) -> None:
        if fut.cancelled():
            return
        decoded = fut.result()  # _run never raises
        with self.lock:
            held = _image_bytes(decoded.image) if decoded.ok else 0
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


def input_label(index: int, item: Any) -> str:
    """The name input ``index`` is reported under: its path, a PIL image's or
    :class:`EncodedImage`'s file name, else ``<input index>``."""
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    return getattr(item, "filename", "") or f"<input {index}>"


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
    if isinstance(item, (str, os.PathLike)) and _is_video_name(item):
        return _plan_video(label, item, max_pixels, target_size, frames, pixel_budget)
    if isinstance(item, EncodedImage) and _is_video_name(item.name):
        # videos are decoded by seeking in a file; bytes (a Ray binary read) have none
        reason = "a video given as bytes: videos are read from local files (give its path)"
        return DecodedImage(path=label, image=None, error=reason)
    if isinstance(item, (str, os.PathLike, EncodedImage)):
        try:
            opened = _open_for_decode(item, max_pixels, target_size)
        except ImageDecodeError as exc:
            return DecodedImage(path=label, image=None, error=exc.reason)
        except Exception as exc:
            return DecodedImage(path=label, image=None, error=_exception_reason(exc))
        return _Job(
            label, opened.cost, lambda: _decode_opened(opened, target_size), opened.im.close
        )
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


def _is_video_name(path: str | os.PathLike) -> bool:
    from awt_engine.video import is_video_path

    return is_video_path(path)


def _plan_video(
    label: str,
    path: str | os.PathLike,
    max_pixels: int | None,
    target_size: int | None,
    frames: int | None,
    pixel_budget: int | None = DEFAULT_PIXEL_BUDGET,
) -> _Job | DecodedImage:
    """Open a video and read its header (its frames decode in the job); never raises.
    Its frames are reduced to fit ``pixel_budget`` when they must (awt_engine.video)."""
    from awt_engine.video import open_video

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
        return DecodedImage(path=label, image=None, error=_exception_reason(exc))

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
        return DecodedImage(path=job.label, image=None, error=_exception_reason(exc))
    return DecodedImage(path=job.label, image=image, error=None)


def _exception_reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_detail(exc)}"


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
