"""Views: determinism, batch independence, RandomResizedCrop semantics, PIL references."""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision import transforms as T

from awt_engine.backbone import PreprocessConfig
from awt_engine.inputs.views import ViewConfig, crop_boxes, image_to_tensor, make_views, view_seed

R = 64  # small input size: the same code paths as 224, a fraction of the time
PP = PreprocessConfig(R, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28), "bicubic")
SMALL = ViewConfig(n_views=9)


def _image(h: int, w: int, seed: int = 0) -> PIL.Image.Image:
    """Smooth gradients plus noise: structure for resizing to act on, no two images alike."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255.0 / w, yy * 255.0 / h, ((xx + 2 * yy) % 53) * 4.8], axis=-1)
    noisy = base + rng.normal(0.0, 20.0, (h, w, 3))
    return PIL.Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _to_levels(views: torch.Tensor, pp: PreprocessConfig) -> np.ndarray:
    """Undo the normalisation: [V, 3, R, R] -> float pixel levels [V, R, R, 3] in 0..255."""
    mean = torch.tensor(pp.mean).view(1, 3, 1, 1)
    std = torch.tensor(pp.std).view(1, 3, 1, 1)
    return ((views.cpu() * std + mean) * 255.0).permute(0, 2, 3, 1).numpy()


def _boxes_for(img: PIL.Image.Image, config: ViewConfig) -> torch.Tensor:
    pixels = image_to_tensor(img)
    gen = torch.Generator().manual_seed(view_seed(pixels, config.seed))
    return crop_boxes(pixels.shape[1], pixels.shape[2], config.n_views - 1, config, gen)


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"n_views": 0}, "0"),
        ({"n_views": -3}, "-3"),
        ({"n_views": 2.5}, "2.5"),
        ({"n_views": True}, "True"),
        ({"scale": (0.0, 1.0)}, "scale"),
        ({"scale": (0.5, 0.2)}, "scale"),
        ({"scale": (0.1, 1.5)}, "1.5"),
        ({"scale": (0.1,)}, "scale"),
        ({"ratio": (0.0, 1.0)}, "ratio"),
        ({"ratio": (2.0, 1.0)}, "ratio"),
        ({"ratio": (1.0, float("inf"))}, "ratio"),
        ({"flip_p": 1.5}, "1.5"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_view_config_rejects_bad_values(kwargs, needle):
    with pytest.raises(ValueError) as info:
        ViewConfig(**kwargs)
    assert needle in str(info.value)


def test_view_config_defaults_and_normalisation():
    cfg = ViewConfig()
    assert (cfg.n_views, cfg.scale, cfg.flip_p, cfg.seed) == (51, (0.08, 1.0), 0.5, 0)
    assert cfg.ratio == pytest.approx((0.75, 4 / 3))
    assert ViewConfig(scale=[0.2, 0.9]).scale == (0.2, 0.9)  # lists become hashable tuples


def test_image_to_tensor_converts_any_mode():
    rgb = _image(5, 7)
    for img in (rgb, rgb.convert("L"), rgb.convert("RGBA"), rgb.convert("P")):
        t = image_to_tensor(img)
        assert t.dtype == torch.uint8 and t.shape == (3, 5, 7)
        expected = np.asarray(img.convert("RGB")).transpose(2, 0, 1)
        assert np.array_equal(t.numpy(), expected)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="uint8"):
        make_views(torch.rand(3, 8, 8), PP)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        make_views(torch.zeros(8, 8, 3, dtype=torch.uint8), PP)
    with pytest.raises(ValueError, match="lanczos"):
        make_views(_image(8, 8), PreprocessConfig(R, PP.mean, PP.std, "lanczos"))


# ---------------------------------------------------------------------------- crop sampling


@pytest.mark.parametrize(("h", "w"), [(375, 500), (40, 30), (1, 300), (2, 3), (1, 1)])
def test_crop_boxes_equal_torchvision_random_resized_crop(h, w):
    """Same draws as torchvision's get_params (global RNG) from the same seed, incl. fallback."""
    n, seed = 300, 1234
    ours = crop_boxes(h, w, n, ViewConfig(), torch.Generator().manual_seed(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dummy = torch.zeros(3, h, w, dtype=torch.uint8)
        ref = [T.RandomResizedCrop.get_params(dummy, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
    assert ours[:, :4].tolist() == [list(box) for box in ref]


def test_crop_boxes_lie_inside_with_area_and_aspect_in_range():
    h, w, n = 600, 800, 2000
    # Ranges where every first draw fits, so no rejection skews the distribution.
    cfg = ViewConfig(scale=(0.05, 0.2), ratio=(0.5, 1.5))
    boxes = crop_boxes(h, w, n, cfg, torch.Generator().manual_seed(0))
    top, left, bh, bw = (boxes[:, i].double() for i in range(4))
    assert boxes.shape == (n, 5) and boxes.dtype == torch.int64
    assert (top >= 0).all() and (left >= 0).all() and (bh >= 1).all() and (bw >= 1).all()
    assert (top + bh <= h).all() and (left + bw <= w).all()
    area = bh * bw / (h * w)
    aspect = bw / bh
    # Rounding w and h (>= 100 pixels here) to whole pixels moves area and aspect by ~1%.
    assert area.min() >= 0.05 * 0.98 and area.max() <= 0.2 * 1.02
    assert aspect.min() >= 0.5 * 0.98 and aspect.max() <= 1.5 * 1.02
    # The whole range is used; area uniform, aspect log-uniform: half the crops on either
    # side of the middle area and of the geometric-mean aspect sqrt(0.5 * 1.5).
    assert area.min() < 0.055 and area.max() > 0.195
    assert abs((area > 0.125).double().mean().item() - 0.5) < 0.05
    assert abs((aspect > math.sqrt(0.75)).double().mean().item() - 0.5) < 0.05


def test_crop_positions_cover_the_image():
    boxes = crop_boxes(300, 300, 2000, ViewConfig(), torch.Generator().manual_seed(3))
    centres_y = (boxes[:, 0] + boxes[:, 2] / 2).double()
    assert centres_y.min() < 60 and centres_y.max() > 240  # not always central


def test_flips_happen_half_the_time():
    n = 4000
    flips = crop_boxes(50, 50, n, ViewConfig(), torch.Generator().manual_seed(0))[:, 4]
    assert set(flips.tolist()) <= {0, 1}
    assert abs(flips.double().mean().item() - 0.5) < 0.04  # 5 standard deviations
    never = crop_boxes(50, 50, 200, ViewConfig(flip_p=0.0), torch.Generator().manual_seed(0))
    always = crop_boxes(50, 50, 200, ViewConfig(flip_p=1.0), torch.Generator().manual_seed(0))
    assert never[:, 4].sum() == 0 and always[:, 4].sum() == 200


def test_view_seed_depends_on_seed_content_and_shape():
    a = image_to_tensor(_image(6, 8, seed=1))
    assert view_seed(a, 0) == view_seed(a.clone(), 0)
    assert view_seed(a, 0) != view_seed(a, 1)
    b = a.clone()
    b[0, 0, 0] ^= 1  # one bit of one pixel
    assert view_seed(a, 0) != view_seed(b, 0)
    flat = torch.arange(18, dtype=torch.uint8)
    assert view_seed(flat.view(3, 2, 3), 0) != view_seed(flat.view(3, 3, 2), 0)
    assert 0 <= view_seed(a, 0) < 2**63


# ---------------------------------------------------------------------------- views


def test_views_shape_dtype_and_determinism():
    img = _image(75, 100)
    views = make_views(img, PP, SMALL)
    assert views.shape == (9, 3, R, R) and views.dtype == torch.float32
    again = make_views(img.copy(), PP, SMALL)  # same content, another object
    assert torch.equal(views, again)
    assert torch.equal(views, make_views(image_to_tensor(img), PP, SMALL))  # PIL == tensor input


def test_seed_and_content_change_the_crops():
    img = _image(75, 100)
    base = make_views(img, PP, SMALL)
    other_seed = make_views(img, PP, ViewConfig(n_views=9, seed=1))
    assert torch.equal(base[0], other_seed[0])  # view 0 is not random
    assert not torch.equal(base[1:], other_seed[1:])
    assert not torch.equal(_boxes_for(img, SMALL), _boxes_for(img, ViewConfig(n_views=9, seed=1)))
    assert not torch.equal(_boxes_for(img, SMALL), _boxes_for(_image(75, 100, seed=5), SMALL))


def test_views_do_not_depend_on_batch_or_global_rng():
    x, y, z = _image(75, 100, 0), _image(75, 100, 1), _image(60, 40, 2)
    alone = make_views(x, PP, SMALL)
    with torch.random.fork_rng(devices=[]):  # leave other tests' RNG alone
        torch.manual_seed(999)
        batch = [make_views(img, PP, SMALL) for img in (y, z, x)]
        torch.manual_seed(5)
        torch.rand(17)
        reordered = [make_views(img, PP, SMALL) for img in (x, z, y)]
    assert torch.equal(alone, batch[2]) and torch.equal(alone, reordered[0])


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_view0_matches_pil_resize_and_centre_crop(interpolation):
    """Independent reference: PIL resize (shorter side -> R) + centre crop + normalise."""
    pp = PreprocessConfig(R, PP.mean, PP.std, interpolation)
    for h, w in [(75, 100), (100, 75), (64, 64), (50, 200)]:
        img = _image(h, w, seed=h + w)
        got = _to_levels(make_views(img, pp, ViewConfig(n_views=1)), pp)[0]  # [R, R, 3]
        short, long_ = min(h, w), max(h, w)
        long_r = int(R * long_ / short)
        size = (long_r, R) if w >= h else (R, long_r)  # PIL takes (width, height)
        resample = PIL.Image.BICUBIC if interpolation == "bicubic" else PIL.Image.BILINEAR
        resized = img.resize(size, resample)
        left = round((size[0] - R) / 2)
        top = round((size[1] - R) / 2)
        ref = np.asarray(resized.crop((left, top, left + R, top + R)), dtype=np.float64)
        diff = np.abs(got - ref)
        # torch's antialiased uint8 kernels follow PIL's; rounding differs by a level at most
        # on a few pixels. A shifted crop or a wrong filter is tens of levels off.
        assert diff.max() <= 1.01, (h, w, diff.max())
        assert diff.mean() < 0.1, (h, w, diff.mean())


def test_random_views_match_pil_crops_of_their_boxes():
    """Views 1.. are PIL crop(box) -> bilinear resize to R -> mirror if flipped, normalised."""
    img = _image(90, 120, seed=7)
    cfg = ViewConfig(n_views=25, flip_p=0.5)
    got = _to_levels(make_views(img, PP, cfg), PP)
    boxes = _boxes_for(img, cfg)
    assert 0 < boxes[:, 4].sum() < 24  # both flipped and unflipped crops are checked
    for k, (top, left, h, w, flip) in enumerate(boxes.tolist(), start=1):
        ref = img.crop((left, top, left + w, top + h)).resize((R, R), PIL.Image.BILINEAR)
        if flip:
            ref = ref.transpose(PIL.Image.FLIP_LEFT_RIGHT)
        diff = np.abs(got[k] - np.asarray(ref, dtype=np.float64))
        # Up-scaled small crops round differently on up to a quarter of their values; a box
        # one pixel off is ~10 levels off on average on this noisy image.
        assert diff.max() <= 2.01 and diff.mean() < 0.5, (k, diff.max(), diff.mean())


def test_one_view_is_view0():
    img = _image(75, 100)
    only = make_views(img, PP, ViewConfig(n_views=1))
    assert only.shape == (1, 3, R, R)
    assert torch.equal(only[0], make_views(img, PP, SMALL)[0])


@pytest.mark.parametrize(("h", "w"), [(1, 1), (2, 3), (3, 2), (1, 40)])
def test_tiny_and_thin_images(h, w):
    img = _image(h, w, seed=3)
    views = make_views(img, PP, SMALL)
    assert views.shape == (9, 3, R, R) and torch.isfinite(views).all()
    if h == w == 1:  # every view of a single pixel is that pixel's colour
        colour = np.asarray(img, dtype=np.float64)[0, 0]
        assert np.abs(_to_levels(views, PP) - colour).max() < 1e-3


def test_normalisation_uses_the_given_mean_and_std():
    img = PIL.Image.new("RGB", (10, 10), (255, 0, 51))
    pp = PreprocessConfig(8, (0.5, 0.25, 0.2), (0.5, 0.25, 0.1), "bicubic")
    views = make_views(img, pp, ViewConfig(n_views=3))
    expected = torch.tensor([(1 - 0.5) / 0.5, (0 - 0.25) / 0.25, (0.2 - 0.2) / 0.1])
    assert torch.allclose(views, expected.view(1, 3, 1, 1).expand_as(views), atol=1e-6)


def test_device_argument_cpu():
    img = _image(30, 40)
    assert torch.equal(make_views(img, PP, SMALL, device="cpu"), make_views(img, PP, SMALL))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_views_match_cpu_views():
    img = _image(75, 100)
    cpu = make_views(img, PP, SMALL)
    gpu = make_views(img, PP, SMALL, device="cuda")
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    # Same boxes and flips; the GPU resizes in float then rounds, the CPU in uint8 kernels.
    levels = np.abs(_to_levels(gpu, PP) - _to_levels(cpu, PP))
    assert levels.max() <= 2.01 and levels.mean() < 0.2
    on_gpu = make_views(image_to_tensor(img).cuda(), PP, SMALL)  # device follows the input
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu, gpu)
