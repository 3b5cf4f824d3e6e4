"""Finding and decoding images: the awkward-input folder, limits, order, discovery."""

from __future__ import annotations

import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from awt_engine.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    DecodedImage,
    ImageDecodeError,
    as_rgb_image,
    decode_images,
    discover_images,
    load_image,
)
from tests.fixtures_images import (
    BOMB_SIZE,
    EXIF_DISPLAY_SIZE,
    EXIF_RED_BLOCK_DISPLAYED,
    PALETTE_OPAQUE_RGB,
    SIXTEEN_BIT_EXPECTED,
    make_bad_input_folder,
)


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-inputs")
    return root, make_bad_input_folder(root)


@pytest.fixture(scope="module")
def decoded(bad_folder):
    root, _ = bad_folder
    results = list(decode_images(discover_images([root]), workers=2))
    return {Path(r.path).relative_to(root).as_posix(): r for r in results}


def _save(path: Path, image: Image.Image, fmt: str | None = None, **params) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **params)
    return path


def _mean(image: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    return np.asarray(image.crop(box), dtype=np.float64).reshape(-1, 3).mean(axis=0)


# --------------------------------------------------------------------------- the folder


def test_every_input_has_the_expected_outcome(bad_folder, decoded):
    _, expected = bad_folder
    assert sorted(decoded) == sorted(expected)  # README.txt skipped, nested files found
    outcomes = {name: "ok" if r.ok else "error" for name, r in decoded.items()}
    assert outcomes == expected
    for name, result in decoded.items():
        assert (result.image is None) != (result.error is None), name
        if result.ok:
            assert result.image.mode == "RGB", name
            result.image.getpixel((0, 0))  # fully loaded, file not needed


def test_error_reasons(decoded):
    assert decoded["empty.jpg"].error == "empty file"
    assert decoded["not_an_image.jpg"].error == "not an image (cannot identify format)"
    assert decoded["truncated.jpg"].error.startswith("truncated or corrupt JPEG (")
    assert "truncated" in decoded["truncated.jpg"].error.split("(", 1)[1]
    width, height = BOMB_SIZE
    assert decoded["bomb.png"].error == (
        f"image too large: {width}x{height} = 400 Mpx exceeds limit 178 Mpx"
    )


def test_sixteen_bit_png_is_scaled_not_clipped(decoded):
    pixels = np.asarray(decoded["sixteen_bit.png"].image)
    assert pixels.shape == (1, 4, 3)
    for channel in range(3):
        assert tuple(pixels[0, :, channel]) == SIXTEEN_BIT_EXPECTED


def test_palette_transparency_composited_on_white(decoded):
    image = decoded["palette_transparent.png"].image
    assert image.size == (16, 16)
    assert image.getpixel((2, 5)) == (255, 255, 255)
    assert image.getpixel((12, 5)) == PALETTE_OPAQUE_RGB


def test_rgba_composited_on_white(decoded):
    r, g, b = decoded["nested/deeper/half_transparent.png"].image.getpixel((3, 3))
    assert r == 255 and 125 <= g <= 129 and g == b


def test_grayscale_becomes_equal_channels(decoded):
    pixels = np.asarray(decoded["grayscale.png"].image)
    assert pixels.shape == (8, 16, 3)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert tuple(pixels[0, :, 0]) == tuple(range(0, 256, 16))


def test_one_pixel_and_bitmap(decoded):
    assert decoded["one_pixel.png"].image.getpixel((0, 0)) == (10, 20, 30)
    assert decoded["nested/bitmap.BMP"].image.size == (5, 3)


def test_cmyk_jpeg_is_converted(decoded):
    red = _mean(decoded["cmyk.jpg"].image, (4, 4, 12, 12))
    assert red[0] > 240 and red[1] < 15 and red[2] < 15


def test_exif_orientation_is_applied(decoded):
    image = decoded["exif_rotated.jpg"].image
    assert image.size == EXIF_DISPLAY_SIZE
    left, top, right, bottom = EXIF_RED_BLOCK_DISPLAYED
    inner = (left + 3, top + 3, right - 3, bottom - 3)
    red = _mean(image, inner)
    assert red[0] > 200 and red[2] < 60, red
    blue = _mean(image, (3, 3, 13, 13))  # displayed top-left: was stored bottom-left
    assert blue[2] > 200 and blue[0] < 60, blue
    assert "exif" not in image.info or image.getexif().get(0x0112, 1) == 1


# --------------------------------------------------------------------------- load_image


def test_load_image_raises_with_path_and_reason(bad_folder):
    root, _ = bad_folder
    with pytest.raises(ImageDecodeError) as exc:
        load_image(root / "empty.jpg")
    assert exc.value.path == str(root / "empty.jpg")
    assert exc.value.reason == "empty file"
    assert str(exc.value) == f"{root / 'empty.jpg'}: empty file"
    copy = pickle.loads(pickle.dumps(exc.value))
    assert (copy.path, copy.reason) == (exc.value.path, exc.value.reason)


def test_load_image_missing_and_folder(tmp_path):
    with pytest.raises(ImageDecodeError, match="file not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageDecodeError, match="is a folder"):
        load_image(tmp_path)


def test_truncated_png_is_an_error(tmp_path):
    rng = np.random.default_rng(1)
    good = _save(
        tmp_path / "good.png", Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8))
    )
    data = good.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match=r"^.*truncated or corrupt PNG") as exc:
        load_image(cut)
    assert exc.value.reason.startswith("truncated or corrupt PNG (")


def test_no_global_pillow_setting_changed(decoded):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert Image.MAX_IMAGE_PIXELS == 1024 * 1024 * 1024 // 4 // 3


def test_default_limit_is_pillows_error_threshold():
    assert DEFAULT_MAX_PIXELS == 2 * (1024 * 1024 * 1024 // 4 // 3) == 178_956_970


def test_custom_pixel_limit(tmp_path):
    path = _save(tmp_path / "a.png", Image.new("RGB", (20, 10), "red"))
    assert load_image(path, max_pixels=200).size == (20, 10)
    with pytest.raises(ImageDecodeError) as exc:
        load_image(path, max_pixels=199)
    assert exc.value.reason == "image too large: 20x10 = 200 px exceeds limit 199 px"
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(path, max_pixels=0)


def test_max_pixels_is_the_policy_not_pillows_global(tmp_path, monkeypatch):
    """Above Pillow's global guard but within max_pixels: decoded, guard restored after."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses > 200 px
    path = _save(tmp_path / "b.png", Image.new("L", (30, 20), 7))  # 600 px
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    assert load_image(path, max_pixels=600).getpixel((0, 0)) == (7, 7, 7)
    assert load_image(path, max_pixels=None).size == (30, 20)
    assert Image.MAX_IMAGE_PIXELS == 100
    with pytest.raises(ImageDecodeError, match=r"30x20 = 600 px exceeds limit 599 px"):
        load_image(path, max_pixels=599)
    assert Image.MAX_IMAGE_PIXELS == 100


def test_bomb_with_pillow_guard_off_still_refused(bad_folder, monkeypatch):
    root, _ = bad_folder
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageDecodeError, match="20000x20000 = 400 Mpx exceeds limit 178 Mpx"):
        load_image(root / "bomb.png")


def test_integer_mode_i_is_scaled():
    image = Image.fromarray(np.array([[0, 32768, 65535, 70000]], dtype=np.int32))
    assert image.mode == "I"
    assert tuple(np.asarray(as_rgb_image(image))[0, :, 0]) == (0, 128, 255, 255)


# --------------------------------------------------------------------------- decode_images


def test_decode_images_keeps_input_order_with_workers(tmp_path):
    paths = []
    for i in range(24):
        if i % 5 == 3:
            path = tmp_path / f"bad{i:02d}.png"
            path.write_bytes(b"junk")
        else:  # earlier images are larger, so they tend to finish later
            path = _save(tmp_path / f"img{i:02d}.png", Image.new("RGB", (400 - 10 * i, 7), "red"))
        paths.append(path)
    results = list(decode_images(paths, workers=4))
    assert [r.path for r in results] == [str(p) for p in paths]
    for i, result in enumerate(results):
        if i % 5 == 3:
            assert result.error == "not an image (cannot identify format)"
        else:
            assert result.image.size == (400 - 10 * i, 7)


def test_decode_images_prefetch_is_bounded(tmp_path):
    path = _save(tmp_path / "x.png", Image.new("RGB", (4, 4), "blue"))
    consumed = 0
    lock = threading.Lock()

    def lazy_paths():
        nonlocal consumed
        for _ in range(100):
            with lock:
                consumed += 1
            yield path

    stream = decode_images(lazy_paths(), workers=2, prefetch=3)
    first = next(stream)
    assert first.ok
    time.sleep(0.05)
    assert consumed <= 4  # prefetch + 1, not the whole input
    for _ in range(5):
        next(stream)
    assert consumed <= 10
    stream.close()
    seen = consumed
    time.sleep(0.05)
    assert consumed == seen


def test_decode_images_single_worker_and_memory_inputs(tmp_path):
    path = _save(tmp_path / "c.png", Image.new("RGB", (3, 2), "white"))
    items = [path, Image.new("L", (5, 5), 9), np.zeros((2, 6, 3), np.uint8), 42]
    for workers in (1, 2):
        results = list(decode_images(items, workers=workers))
        assert [r.path for r in results] == [str(path), "<input 1>", "<input 2>", "<input 3>"]
        assert [r.ok for r in results] == [True, True, True, False]
        assert results[1].image.getpixel((0, 0)) == (9, 9, 9)
        assert results[2].image.size == (6, 2)
        assert "TypeError" in results[3].error and "int" in results[3].error


def test_decode_images_validates_arguments_eagerly():
    with pytest.raises(ValueError, match="workers"):
        decode_images([], workers=0)
    with pytest.raises(ValueError, match="prefetch"):
        decode_images([], prefetch=0)
    assert list(decode_images([])) == []


def test_decoded_image_needs_exactly_one_outcome():
    with pytest.raises(ValueError):
        DecodedImage(path="x", image=None, error=None)
    with pytest.raises(ValueError):
        DecodedImage(path="x", image=Image.new("RGB", (1, 1)), error="boom")


# --------------------------------------------------------------------------- discovery


def _tree(root: Path) -> None:
    for rel in ["b.jpg", "a.PNG", "sub/c.webp", "sub/deeper/d.tiff", "notes.txt", "e.dat"]:
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"x")
    (root / ".hidden.jpg").write_bytes(b"x")
    (root / ".cache").mkdir()
    (root / ".cache" / "f.jpg").write_bytes(b"x")


def test_discover_folder_recursive_sorted(tmp_path):
    _tree(tmp_path)
    found = discover_images([tmp_path])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a.PNG",
        "b.jpg",
        "sub/c.webp",
        "sub/deeper/d.tiff",
    ]


def test_discover_files_globs_and_dedup(tmp_path):
    _tree(tmp_path)
    found = discover_images(
        [
            tmp_path / "e.dat",  # a file is taken as given
            str(tmp_path / "**" / "*.webp"),
            str(tmp_path / "sub"),  # c.webp again: not repeated
            str(tmp_path / "sub" / ".." / "b.jpg"),
            str(tmp_path / "b.jpg"),  # same file, other spelling: not repeated
            str(tmp_path / "su?"),  # glob matching a folder
        ]
    )
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "e.dat",
        "sub/c.webp",
        "sub/deeper/d.tiff",
        "sub/../b.jpg",
    ]


def test_discover_reports_every_bad_input(tmp_path):
    _tree(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError) as exc:
        discover_images(
            [tmp_path / "b.jpg", tmp_path / "missing.jpg", empty, str(tmp_path / "*.gif")]
        )
    msg = str(exc.value)
    assert "missing.jpg' (does not exist)" in msg
    assert f"{str(empty)!r} (folder holds no" in msg
    assert "*.gif' (pattern matched no image files)" in msg
    assert "b.jpg'" not in msg


def test_image_extensions():
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"} == IMAGE_EXTENSIONS


# --------------------------------------------------------------------------- as_rgb_image


def test_as_rgb_image_arrays():
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (1, 2, 3)
    assert as_rgb_image(rgb).getpixel((0, 0)) == (1, 2, 3)
    assert as_rgb_image(rgb).size == (3, 2)
    assert as_rgb_image(np.full((2, 2), 200, np.uint8)).getpixel((1, 1)) == (200, 200, 200)
    assert as_rgb_image(np.full((2, 2, 1), 5, np.uint8)).getpixel((0, 0)) == (5, 5, 5)
    rgba = np.zeros((1, 1, 4), np.uint8)  # fully transparent black -> white
    assert as_rgb_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert as_rgb_image(np.full((1, 1), 65535, np.uint16)).getpixel((0, 0)) == (255, 255, 255)
    assert as_rgb_image(np.ones((1, 1), bool)).getpixel((0, 0)) == (255, 255, 255)
    assert as_rgb_image(np.full((1, 1, 3), 0.5)).getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize(
    "array, error, fragment",
    [
        (np.zeros((2, 2, 2), np.uint8), ValueError, "shape (2, 2, 2)"),
        (np.zeros((4,), np.uint8), ValueError, "shape (4,)"),
        (np.zeros((0, 3, 3), np.uint8), ValueError, "empty"),
        (np.zeros((2, 2), np.int8), TypeError, "int8"),
        (np.full((2, 2), 2.0), ValueError, "[0, 1]"),
    ],
)
def test_as_rgb_image_bad_arrays(array, error, fragment):
    with pytest.raises(error) as exc:
        as_rgb_image(array)
    assert fragment in str(exc.value)


@pytest.mark.parametrize("obj", [42, [[0, 0]], {"a": 1}, b"\x89PNG"])
def test_as_rgb_image_unsupported_types(obj):
    with pytest.raises(TypeError) as exc:
        as_rgb_image(obj)
    assert type(obj).__qualname__ in str(exc.value)


def test_as_rgb_image_pil_inputs_are_converted_not_mutated(tmp_path):
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    out = as_rgb_image(palette)
    assert out.mode == "RGB" and out.getpixel((1, 0)) == (10, 20, 30)
    assert palette.mode == "P"
    rgb = Image.new("RGB", (2, 2), "red")
    assert as_rgb_image(rgb) is not rgb
    path = _save(tmp_path / "p.png", Image.new("RGB", (2, 2), "red"))
    assert as_rgb_image(path).getpixel((0, 0)) == (255, 0, 0)
    assert as_rgb_image(str(path)).getpixel((0, 0)) == (255, 0, 0)
    with Image.open(path) as lazy:
        assert as_rgb_image(lazy).getpixel((1, 1)) == (255, 0, 0)
