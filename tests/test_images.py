"""Finding and decoding images: the awkward-input folder, limits, order, discovery."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from awt_engine.inputs import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    DecodedImage,
    EncodedImage,
    ImageDecodeError,
    UnreadableFolder,
    as_rgb_image,
    decode_images,
    discover_images,
    find_images,
    load_image,
)
from awt_engine.inputs import decode as decode_mod
from tests.fixtures_images import (
    BOMB_SIZE,
    EXIF_DISPLAY_SIZE,
    EXIF_RED_BLOCK_DISPLAYED,
    PALETTE_OPAQUE_RGB,
    SIXTEEN_BIT_EXPECTED,
    chmod_000,
    deny_listing,
    make_bad_input_folder,
    run_with_permissions,
    solid_png,
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


@pytest.mark.parametrize("target_size", [None, 8])
def test_encoded_bytes_decode_exactly_as_their_file(bad_folder, target_size):
    """Every awkward file's bytes (as Ray's read_binary_files or object storage give
    them) have the file's outcome: the same pixels, or the same reason under its name."""
    root, _ = bad_folder
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in IMAGE_EXTENSIONS]
    readable = []
    for p in files:
        try:
            readable.append((p, p.read_bytes()))
        except OSError:  # e.g. a file without read permission: no bytes to hand over
            pass
    assert len(readable) > 10
    kw = dict(workers=2, target_size=target_size)
    by_file = list(decode_images([p for p, _ in readable], **kw))
    by_bytes = list(decode_images([EncodedImage(str(p), b) for p, b in readable], **kw))
    n_ok = 0
    for f, b in zip(by_file, by_bytes, strict=True):
        assert b.path == f.path and b.error == f.error
        if f.ok:
            n_ok += 1
            assert b.image.size == f.image.size
            np.testing.assert_array_equal(np.asarray(b.image), np.asarray(f.image))
    assert 0 < n_ok < len(readable)  # good and bad files both compared
    with pytest.raises(ImageDecodeError, match="empty file"):
        load_image(EncodedImage("x.png", b""))
    # a video's bytes (a Ray binary read of s3://...) get their own row, saying why
    (row,) = decode_images([EncodedImage("s3://b/clip.mp4", b"\x00\x00\x00\x18ftypmp42")])
    assert row.path == "s3://b/clip.mp4" and not row.ok and "local files" in row.error


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


# --------------------------------------------------------------------------- huge images

# At target_size R = 8 an image is reduced once its shorter side reaches 2 * 16 * 8 = 256
# px, by shorter // 128 (so its shorter side stays >= 16 R = 128).
R = 8


def _noise(height: int, width: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _block_means(pixels: np.ndarray, factor: int) -> np.ndarray:
    h, w, _ = pixels.shape
    blocks = pixels.reshape(h // factor, factor, w // factor, factor, 3).astype(np.float64)
    return blocks.mean(axis=(1, 3))


def test_huge_png_is_reduced_to_box_means_of_the_documented_factor(tmp_path):
    pixels = _noise(390, 519)  # shorter side 390: 390 // 128 = 3
    path = _save(tmp_path / "big.png", Image.fromarray(pixels))
    out = load_image(path, target_size=R)
    assert out.mode == "RGB" and out.size == (173, 130)
    diff = np.abs(np.asarray(out, dtype=np.float64) - _block_means(pixels, 3))
    assert diff.max() < 1.0  # each pixel is its 3 x 3 block's mean (Pillow's rounding)


def test_images_below_the_threshold_are_untouched(tmp_path):
    small = _save(tmp_path / "just_below.png", Image.fromarray(_noise(255, 900)))
    assert np.array_equal(
        np.asarray(load_image(small, target_size=R)), np.asarray(load_image(small))
    )
    # an ordinary 12-Mpx phone photo at CLIP's 224 px: never reduced
    photo = _save(tmp_path / "photo.jpg", Image.new("RGB", (4032, 3024), (90, 140, 200)))
    assert load_image(photo, target_size=224).size == (4032, 3024)


def test_huge_jpeg_is_decoded_at_reduced_scale_by_libjpeg(tmp_path):
    # R = 16: the bound is 256 px; shorter side 768 -> factor 3. libjpeg decodes at 1/2
    # (the largest of 1/2, 1/4, 1/8 not beyond 3), after which 384 // 256 = 1: 768 x 384.
    # Image.reduce alone would have given 512 x 256.
    y, x = np.mgrid[0:768, 0:1536]
    smooth = np.stack([x * 255 // 1535, y * 255 // 767, (x + y) % 256 // 4 * 0 + 90], axis=-1)
    path = _save(tmp_path / "big.jpg", Image.fromarray(smooth.astype(np.uint8)), quality=95)
    out = load_image(path, target_size=16)
    assert out.size == (768, 384)
    expected = _block_means(np.asarray(load_image(path), dtype=np.uint8), 2)
    assert np.abs(np.asarray(out, dtype=np.float64) - expected).mean() < 2.0


def test_reduced_jpeg_keeps_exif_orientation(tmp_path):
    # stored 1024 x 512 with a red top-left quarter, orientation 6: factor 512 // 128 = 4
    # (decoded at 1/4), shown 128 wide x 256 high with the red block at the top right.
    stored = Image.new("RGB", (1024, 512), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 256, 256))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(tmp_path / "rotated.jpg", stored, quality=95, exif=exif.tobytes())
    out = load_image(path, target_size=R)
    assert out.size == (128, 256)
    assert _mean(out, (80, 10, 120, 50))[0] > 200  # top right: red
    assert _mean(out, (10, 200, 50, 240))[2] > 200  # bottom left: blue
    assert "exif" not in out.info or out.getexif().get(0x0112, 1) == 1


def test_palette_images_are_converted_before_they_are_reduced(tmp_path):
    palette = Image.new("P", (512, 256), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0] + [0, 0, 0] * 253)
    stripes = np.zeros((256, 512), np.uint8)
    stripes[:, 1::2] = 2  # red and green columns; averaging the indices would give blue
    palette.putdata(stripes.ravel().tolist())
    out = load_image(_save(tmp_path / "p.png", palette), target_size=R)  # factor 2
    assert out.size == (256, 128)
    r, g, b = out.getpixel((100, 50))
    assert abs(r - 128) <= 1 and abs(g - 128) <= 1 and b == 0


def test_reduction_depends_only_on_the_image(tmp_path):
    png = _save(tmp_path / "a.png", Image.fromarray(_noise(390, 519)))
    jpg = _save(tmp_path / "b.jpg", Image.fromarray(_noise(600, 300, seed=2)), quality=90)
    small = _save(tmp_path / "c.png", Image.fromarray(_noise(40, 50, seed=3)))
    paths = [png, jpg, small, png]
    alone = [np.asarray(load_image(p, target_size=R)) for p in paths]
    assert alone[1].shape == (300, 150, 3)  # 300 // 128 = 2 -> decoded at 1/2
    for workers in (1, 3):
        for order in (paths, paths[::-1]):
            got = {
                r.path: np.asarray(r.image)
                for r in decode_images(order, workers=workers, target_size=R)
            }
            for p, want in zip(paths, alone, strict=True):
                assert np.array_equal(got[str(p)], want)
    # reducing a reduced image changes nothing; arrays follow the same rule as files
    again = as_rgb_image(Image.fromarray(alone[0]), target_size=R)
    assert np.array_equal(np.asarray(again), alone[0])
    from_array = as_rgb_image(np.asarray(Image.open(png)), target_size=R)
    assert np.array_equal(np.asarray(from_array), alone[0])
    with pytest.raises(ValueError, match="target_size"):
        load_image(png, target_size=0)


def _track_decodes(monkeypatch) -> list[str]:
    started: list[str] = []
    real = decode_mod.decode_opened

    def tracking(opened, target_size):
        started.append(opened.path.name)
        return real(opened, target_size)

    monkeypatch.setattr(decode_mod, "decode_opened", tracking)
    return started


def test_pixel_budget_smaller_than_an_image_decodes_one_at_a_time(tmp_path, monkeypatch):
    paths = [_save(tmp_path / f"{i}.png", Image.new("RGB", (64, 48), (i, 0, 0))) for i in range(8)]
    started = _track_decodes(monkeypatch)
    stream = decode_images(paths, workers=4, prefetch=6, pixel_budget=1)
    for i, result in enumerate(stream):
        time.sleep(0.02)  # every chance for the pool to run ahead
        assert len(started) == i + 1  # nothing else decoding, or decoded and waiting
        assert result.image.getpixel((0, 0)) == (i, 0, 0)  # still decoded: alone
    assert started == [p.name for p in paths]


def test_pixel_budget_lets_images_that_fit_decode_ahead(tmp_path, monkeypatch):
    paths = [_save(tmp_path / f"{i}.png", Image.new("RGB", (64, 48), (i, 0, 0))) for i in range(8)]
    started = _track_decodes(monkeypatch)
    # As documented: a 64 x 48 RGB PNG is charged 12 KB decoded + 2 x 12 KB output while
    # it decodes, its 12 KB output until consumed. Room for one decoding and one held:
    held, decoding = 64 * 48 * 4, 3 * 64 * 48 * 4
    stream = decode_images(paths, workers=4, prefetch=6, pixel_budget=held + decoding)
    first = next(stream)
    for _ in range(200):  # <= 2 s
        if len(started) >= 2:
            break
        time.sleep(0.01)
    time.sleep(0.05)
    assert first.ok and len(started) == 2  # the next one decoded while this one is held
    assert [r.image.getpixel((0, 0))[0] for r in stream] == list(range(1, 8))
    stream.close()


def test_abandoned_budgeted_stream_closes_promptly(tmp_path):
    paths = [_save(tmp_path / f"{i}.png", Image.new("RGB", (32, 32), "red")) for i in range(6)]
    stream = decode_images(paths, workers=2, pixel_budget=1)
    assert next(stream).ok
    done = threading.Event()
    closer = threading.Thread(target=lambda: (stream.close(), done.set()), daemon=True)
    closer.start()
    assert done.wait(5), "closing the stream hung"


@pytest.mark.slow
def test_six_144_megapixel_pngs_peak_within_one_decode(tmp_path):
    """The issue's case: six 12000 x 12000 PNGs classified; peak RSS in a fresh process."""
    data = solid_png(12000, 12000, (200, 30, 30))
    paths = []
    for i in range(6):
        paths.append(str(tmp_path / f"huge{i}.png"))
        Path(paths[-1]).write_bytes(data)
    script = """
import json, resource, sys
import awt_engine
from tests.fixtures_embedders import ColourEmbedder
clf = awt_engine.create_classifier(
    classes=["red", "green", "blue"], embedder=ColourEmbedder(), views=3, workers=2
)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
labels = [p.predictions[0]["label"] if p.ok else p.error for p in clf.classify(sys.argv[1:])]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"labels": labels, "grown": (after - before) * 1024}))
"""
    res = subprocess.run(
        [sys.executable, "-c", script, *paths],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent.parent,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["labels"] == ["red"] * 6
    one_image = 12000 * 12000 * 4  # one decoded at full size: PNG cannot decode reduced
    assert out["grown"] < 1.75 * one_image, f"peak grew {out['grown'] / 2**30:.2f} GiB"


# --------------------------------------------------------------------------- unreadable folders


def _locked_tree(root: Path) -> Path:
    for rel in ["a.png", "open/c.png", "locked/b.png", "locked/deeper/d.png"]:
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"x")
    return root / "locked"


def test_find_images_reports_unreadable_subfolders(tmp_path, monkeypatch):
    locked = _locked_tree(tmp_path)
    deny_listing(monkeypatch, locked)
    found = find_images([tmp_path])
    assert [p.relative_to(tmp_path).as_posix() for p in found.images] == ["a.png", "open/c.png"]
    assert found.unreadable == [
        UnreadableFolder(str(locked), "cannot read folder (permission denied)")
    ]
    with pytest.warns(UserWarning, match=f"{locked}: cannot read folder"):
        assert discover_images([tmp_path]) == found.images
    # an unreadable folder given itself, or through a glob: reported, not "empty"
    assert find_images([locked]).unreadable == found.unreadable
    assert find_images([locked]).images == []
    assert find_images([str(tmp_path / "lo*")]).unreadable == found.unreadable


def test_find_images_with_real_permissions(tmp_path):
    """chmod 000, checked where permissions apply (as root: capabilities dropped)."""
    locked = _locked_tree(tmp_path)
    code = (
        "import json, sys; from awt_engine.inputs.files import find_images; "
        "f = find_images([sys.argv[1]]); "
        "print(json.dumps([[str(p) for p in f.images], [list(u) for u in f.unreadable]]))"
    )
    with chmod_000(locked):
        res = run_with_permissions(code, str(tmp_path))
    assert res.returncode == 0, res.stderr
    images, unreadable = json.loads(res.stdout)
    assert images == [str(tmp_path / "a.png"), str(tmp_path / "open" / "c.png")]
    assert unreadable == [[str(locked), "cannot read folder (permission denied)"]]
