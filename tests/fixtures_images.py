"""A folder of awkward image inputs, built with PIL/numpy in a fraction of a second.

``make_bad_input_folder(path)`` writes the files and returns ``{relative posix path:
"ok" | "error"}`` for exactly the files ``discover_images([path])`` finds (a README.txt is
also written, which discovery must skip). The geometry constants below let tests check
what the decoder produced.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# sixteen_bit.png: one row of these 16-bit values ...
SIXTEEN_BIT_VALUES = (0, 257, 32768, 65535)
# ... decodes to these 8-bit grey levels (scaled, not clipped).
SIXTEEN_BIT_EXPECTED = (0, 1, 128, 255)

# exif_rotated.jpg: stored 64 wide x 32 high, blue, with a red 16x16 block at the stored
# top-left, and EXIF orientation 6 ("rotate 90 degrees clockwise to display").
EXIF_STORED_SIZE = (64, 32)
EXIF_DISPLAY_SIZE = (32, 64)
EXIF_RED_BLOCK_DISPLAYED = (16, 0, 32, 16)  # box (left, top, right, bottom) after rotation

# bomb.png: declared size, far above Pillow's default limit (~179 Mpx); ~50 KB on disk.
BOMB_SIZE = (20000, 20000)

CMYK_RED = (0, 255, 255, 0)
PALETTE_OPAQUE_RGB = (0, 128, 0)  # right half of palette_transparent.png; left half transparent


def make_bad_input_folder(path: str | Path) -> dict[str, str]:
    """Write the awkward inputs under ``path``; return {relative path: "ok" | "error"}."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}

    def put(name: str, outcome: str, data: bytes) -> None:
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        expected[name] = outcome

    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))

    put("good_rgb.jpg", "ok", _encode(noise, "JPEG", quality=90))
    good_jpeg = _encode(noise, "JPEG", quality=90)
    put("truncated.jpg", "error", good_jpeg[: len(good_jpeg) // 2])
    put("not_an_image.jpg", "error", b"this is a text file, not a JPEG\n" * 4)
    put("empty.jpg", "error", b"")
    put("cmyk.jpg", "ok", _encode(Image.new("CMYK", (16, 16), CMYK_RED), "JPEG", quality=95))

    sixteen = np.array([SIXTEEN_BIT_VALUES], dtype=np.uint16)
    put("sixteen_bit.png", "ok", _encode(Image.fromarray(sixteen), "PNG"))

    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([255, 0, 255, *PALETTE_OPAQUE_RGB] + [0, 0, 0] * 254)
    palette.paste(0, (0, 0, 8, 16))  # left half: index 0, declared transparent
    put("palette_transparent.png", "ok", _encode(palette, "PNG", transparency=0))

    grey = Image.fromarray(np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1)))
    put("grayscale.png", "ok", _encode(grey, "PNG"))
    put("one_pixel.png", "ok", _encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"))

    rotated = Image.new("RGB", EXIF_STORED_SIZE, (0, 0, 255))
    rotated.paste((255, 0, 0), (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    put("exif_rotated.jpg", "ok", _encode(rotated, "JPEG", quality=95, exif=exif.tobytes()))

    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
    put("nested/deeper/half_transparent.png", "ok", _encode(rgba, "PNG"))
    put("nested/bitmap.BMP", "ok", _encode(Image.new("RGB", (5, 3), (1, 2, 3)), "BMP"))

    put("bomb.png", "error", bomb_png(*BOMB_SIZE))

    (root / "README.txt").write_text("not an image; discovery skips it\n", encoding="utf-8")
    return expected


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of the given size, all black; tiny on disk."""
    row = b"\x00" + bytes((width + 7) // 8)  # filter byte "None" + packed bits
    return _png(width, height, bit_depth=1, colour_type=0, row=row)


def solid_png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """An 8-bit RGB PNG, every pixel ``rgb``, streamed through zlib: a 12000 x 12000 one
    (144 Mpx, 576 MB decoded) takes ~0.7 s to build and ~1.9 MB on disk."""
    row = b"\x00" + bytes(rgb) * width
    return _png(width, height, bit_depth=8, colour_type=2, row=row)


def _png(width: int, height: int, *, bit_depth: int, colour_type: int, row: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    compressor = zlib.compressobj(9 if bit_depth == 1 else 1)  # level 1: fast on 432 MB
    rows_per_block = max(1, min(1000, (1 << 24) // len(row)))  # <= ~16 MB of rows at once
    parts = []
    for start in range(0, height, rows_per_block):
        parts.append(compressor.compress(row * min(rows_per_block, height - start)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", b"".join(parts))
        + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- unreadable folders


def deny_listing(monkeypatch, *folders: str | os.PathLike) -> None:
    """Make ``os.scandir`` (hence ``os.walk``) fail with "permission denied" on these
    folders, as ``chmod 000`` would for a normal user. Tests run as root here, where
    chmod does not stop reads; :func:`run_with_permissions` checks the real thing."""
    real = os.scandir
    denied = {os.path.abspath(os.fspath(f)) for f in folders}

    def scandir(path="."):
        if os.path.abspath(os.fspath(path)) in denied:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


@contextlib.contextmanager
def chmod_000(folder: Path):
    """``folder`` with no permissions at all, restored afterwards (so it can be deleted)."""
    mode = folder.stat().st_mode
    folder.chmod(0)
    try:
        yield folder
    finally:
        folder.chmod(mode)


def run_with_permissions(code: str, *args: str) -> subprocess.CompletedProcess:
    """``python -c code args`` in a process where file permissions apply: as it is for a
    normal user; as root, with the two capabilities that bypass them (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH) dropped by ``setpriv``. Skips the test when that is impossible."""
    command = [sys.executable, "-c", code, *args]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot make permissions apply")
        caps = "-dac_override,-dac_read_search"
        command = [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}", *command]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent
    )
    if result.returncode != 0 and "setpriv" in result.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {result.stderr.strip()}")
    return result
