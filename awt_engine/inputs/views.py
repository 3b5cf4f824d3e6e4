"""Image -> views: the un-augmented image plus random resized crops (docs/design.md section 2).

View 0 is the image with its shorter side resized to R (the model's interpolation,
bicubic by default) and centre-cropped to R x R. Views 1..V-1 are random resized crops
of the original image with torchvision ``RandomResizedCrop`` semantics (area scale,
log-uniform aspect ratio, 10 attempts then a centre-crop fallback), resized bilinearly to
R x R and flipped horizontally with probability ``flip_p``. All views are normalised with
the backbone's mean/std.

Reproducibility: the crops of an image are drawn from a generator seeded with
``view_seed(pixels, config.seed)``, a hash of the seed and the decoded pixels. They depend
only on the seed and the image content, never on the batch, its order, the device, or
the global RNG. The crop boxes are drawn on the CPU; the pixel work (crop, resize, flip,
normalise) runs on ``device`` with tensor ops, so it can run on a GPU. (On CUDA torch
resizes uint8 images in float and rounds, so pixels may differ from the CPU's by a level.)

Videos (:func:`make_video_views`): from the n frames sampled over the clip
(:mod:`awt_engine.inputs.video`), view 0 is the middle frame (index n // 2) prepared exactly like
an image's view 0, views 1..n-1 are the other frames in time order prepared the same way,
and the remaining V - n views are random resized crops of random frames (the frame drawn
from the same generator before each box), seeded by :func:`video_view_seed` over all the
frames' pixels. With V < n only the first V of those frame views are made; without
``raw_view`` every view is a crop of a random frame. The frames are turned into tensors
one at a time (for the seed's hash, then for their views), never all together: a
video holds its decoded frames (within the pixel budget, :mod:`awt_engine.inputs.video`) and
at most two frames' tensors beside them.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from awt_engine.inputs.base import DEFAULT_FRAMES
from awt_engine.inputs.frames import VideoFrames

if TYPE_CHECKING:
    from awt_engine.models.base import PreprocessConfig

# Attempts before RandomResizedCrop falls back to a centre crop (torchvision's value).
_CROP_ATTEMPTS = 10
# Names how crop seeds are made from the pixels; caches of views key on it.
VIEW_SEED_VERSION = "awt-engine/views/v2"
# The same for a video's views (seeded by all its sampled frames).
VIDEO_SEED_VERSION = "awt-engine/video-views/v1"
_INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


@dataclass(frozen=True)
class ViewConfig:
    """How many views to make and how to draw the random crops."""

    n_views: int = 51  # the image plus 50 crops: the AWT paper's setting
    scale: tuple[float, float] = (0.08, 1.0)  # crop area / image area: RandomResizedCrop's range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop width / height, log-uniform: same source
    flip_p: float = 0.5  # horizontal flip probability: the usual CLIP/AWT augmentation
    seed: int = 0  # with the image content, fixes every crop
    # View 0 is the un-augmented image (AWT at test time). Few-shot training (the AWT
    # adapter's K_TRANSFORMS views, CoOp's one view) augments every view: False.
    raw_view: bool = True
    # Resize of the crops: bilinear at test time (AWT's views); the few-shot papers' Dassl
    # configs train with bicubic random resized crops.
    crop_interpolation: str = "bilinear"
    # Frames sampled uniformly over a video (images ignore it); each is a view, the rest
    # of the views are crops of them. 8: a common test-time clip of CLIP video models.
    frames: int = DEFAULT_FRAMES
    # (ops, magnitude) of ALBEF's RandAugment on every image crop (eP-ALM trains with
    # (2, 7)); (0, 0): off. Drawn from the view's seed (inputs/randaugment.py). Videos: off.
    randaugment: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if isinstance(self.n_views, bool) or not isinstance(self.n_views, int | np.integer):
            raise ValueError(f"n_views must be an integer >= 1, got {self.n_views!r}")
        if self.n_views < 1:
            raise ValueError(
                f"n_views must be >= 1 (view 0 is the image itself), got {self.n_views}"
            )
        scale = _pair("scale", self.scale)
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(
                f"scale must satisfy 0 < low <= high <= 1 (fractions of the image area), "
                f"got {self.scale!r}"
            )
        ratio = _pair("ratio", self.ratio)
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(
                f"ratio must satisfy 0 < low <= high (crop width / height), got {self.ratio!r}"
            )
        if not 0.0 <= float(self.flip_p) <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {self.flip_p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if (
            isinstance(self.frames, bool)
            or not isinstance(self.frames, int | np.integer)
            or self.frames < 1
        ):
            raise ValueError(f"frames must be an integer >= 1 (per video), got {self.frames!r}")
        object.__setattr__(self, "n_views", int(self.n_views))
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "ratio", ratio)
        object.__setattr__(self, "flip_p", float(self.flip_p))
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "frames", int(self.frames))
        object.__setattr__(self, "raw_view", bool(self.raw_view))
        ra = tuple(self.randaugment)
        if len(ra) != 2 or not all(isinstance(v, int) and v >= 0 for v in ra) or ra[1] > 10:
            raise ValueError(f"randaugment must be (ops >= 0, magnitude 0..10), got {ra!r}")
        object.__setattr__(self, "randaugment", ra)
        if self.crop_interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"crop_interpolation must be one of {', '.join(_INTERPOLATIONS)}, "
                f"got {self.crop_interpolation!r}"
            )


def _pair(name: str, value) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of numbers (low, high), got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return lo, hi


def image_to_tensor(img: PIL.Image.Image) -> torch.Tensor:
    """A PIL image as a uint8 RGB tensor [3, H, W] (any mode is converted to RGB first).

    The tensor is a channels-last view of the decoded bytes (HWC in memory, as PIL holds
    them): no layout copy is made, and torch's uint8 resize kernels run fastest on it.
    It is read-only: the view code never writes into its input.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")  # as CLIP's own preprocessing does: alpha is dropped
    arr = np.asarray(img, dtype=np.uint8)  # [H, W, 3], a read-only view of PIL's bytes
    with warnings.catch_warnings():  # torch warns that the array is not writable: by design
        warnings.simplefilter("ignore", UserWarning)
        hwc = torch.from_numpy(arr)
    return hwc.permute(2, 0, 1)  # [3, H, W] logically, HWC in memory


def _check_pixels(image: torch.Tensor) -> torch.Tensor:
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(
            f"expected a uint8 RGB image tensor [3, H, W], got dtype {image.dtype} and shape "
            f"{tuple(image.shape)} (convert PIL images with image_to_tensor)"
        )
    if image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"image is empty: shape {tuple(image.shape)}")
    return image


def view_seed(image_uint8: torch.Tensor, seed: int) -> int:
    """A 63-bit generator seed from ``seed`` and the image's shape and pixel bytes.

    The bytes are hashed in HWC order (RGB per pixel, as decoded), which is the memory
    order of :func:`image_to_tensor`'s tensors, so no copy is needed for them.
    """
    pixels = _check_pixels(image_uint8).detach().to("cpu")
    hwc = pixels.permute(1, 2, 0).contiguous()  # a no-op for channels-last pixels
    h = hashlib.sha256(VIEW_SEED_VERSION.encode() + b"\0")
    h.update(f"{int(seed)}\0{'x'.join(map(str, pixels.shape))}\0".encode())
    h.update(hwc.numpy().data)  # zero-copy view of the bytes
    return int.from_bytes(h.digest()[:8], "little") >> 1


def _draw(generator: torch.Generator) -> torch.Tensor:
    """One float32 slot on the generator's device (the CPU), whatever the default device."""
    return torch.empty(1, device=generator.device)


def crop_boxes(
    height: int, width: int, n: int, config: ViewConfig, generator: torch.Generator
) -> torch.Tensor:
    """``n`` random resized crop boxes, int64 [n, 5] with columns (top, left, h, w, flip).

    Each box follows torchvision's ``RandomResizedCrop.get_params``: draw a target area
    (``scale`` x image area) and a log-uniform aspect ratio; accept if the rounded box fits,
    else retry, and after 10 attempts fall back to the largest centre crop whose aspect
    lies in ``ratio``. The draws use the same ops in the same order, so with a generator
    in the state of the global one the boxes equal torchvision's. The n flip draws come
    after all boxes, so box k does not depend on n (its flip does).
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be at least 1 x 1, got {height} x {width}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    area = height * width
    log_ratio = torch.log(torch.tensor(config.ratio, device="cpu"))  # float32, as torchvision
    log_lo, log_hi = float(log_ratio[0]), float(log_ratio[1])
    boxes = torch.empty(n, 5, dtype=torch.int64, device="cpu")
    for k in range(n):
        for _ in range(_CROP_ATTEMPTS):
            target_area = (
                area * _draw(generator).uniform_(*config.scale, generator=generator).item()
            )
            aspect = torch.exp(
                _draw(generator).uniform_(log_lo, log_hi, generator=generator)
            ).item()
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(
                    torch.randint(0, height - h + 1, (1,), generator=generator, device="cpu").item()
                )
                left = int(
                    torch.randint(0, width - w + 1, (1,), generator=generator, device="cpu").item()
                )
                break
        else:  # fallback: centre crop, clipped to the aspect range
            in_ratio = width / height
            if in_ratio < min(config.ratio):
                w = width
                h = round(w / min(config.ratio))
            elif in_ratio > max(config.ratio):
                h = height
                w = round(h * max(config.ratio))
            else:
                w, h = width, height
            # torchvision can round to 0 here for extreme ratios; a crop has >= 1 pixel.
            w, h = min(max(w, 1), width), min(max(h, 1), height)
            top, left = (height - h) // 2, (width - w) // 2
        boxes[k, :4] = torch.tensor([top, left, h, w], device="cpu")
    # rand() < 1 always, so flip_p = 1 flips every crop and flip_p = 0 none.
    boxes[:, 4] = (torch.rand(n, generator=generator, device="cpu") < config.flip_p).long()
    return boxes  # [n, 5]


def _crops(pixels: torch.Tensor, n_crops: int, config: ViewConfig, seed: int | None):
    """The crop boxes of an image's views: [n_crops, 5] (see :func:`crop_boxes`)."""
    if not n_crops:  # the raw view alone needs no random draws (nor the hash that seeds them)
        return torch.empty(0, 5, dtype=torch.int64, device="cpu")
    if seed is None:
        seed = view_seed(pixels, config.seed)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    _, height, width = pixels.shape
    return crop_boxes(height, width, n_crops, config, generator)


def view_boxes(
    image: PIL.Image.Image | torch.Tensor,
    preprocess: PreprocessConfig,
    config: ViewConfig = ViewConfig(),
    *,
    seed: int | None = None,
) -> torch.Tensor:
    """Where each of :func:`make_views`' views comes from in the image: int64 [V, 5],
    columns (top, left, height, width, flipped), the very boxes ``make_views`` draws.

    View 0 (with ``raw_view``) is the centre square the shorter-side resize keeps.
    """
    pixels = _check_pixels(image_to_tensor(image) if isinstance(image, PIL.Image.Image) else image)
    _, height, width = pixels.shape
    n_crops = config.n_views - 1 if config.raw_view else config.n_views
    out = [_crops(pixels, n_crops, config, seed)]
    if config.raw_view:
        side = min(height, width)
        raw = torch.tensor(
            [[(height - side) // 2, (width - side) // 2, side, side, 0]], device="cpu"
        )
        out.insert(0, raw)
    return torch.cat(out)


def make_views(
    image: PIL.Image.Image | torch.Tensor,
    preprocess: PreprocessConfig,
    config: ViewConfig = ViewConfig(),
    *,
    device: torch.device | str | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """The V views of one image, float32 [V, 3, R, R], normalised with the model's mean/std.

    ``image`` is a PIL image or a uint8 RGB tensor [3, H, W]. The pixel work runs on
    ``device`` (default: the tensor's device, the CPU for PIL images). ``seed`` seeds
    the crop draws directly; None derives it from the pixels and ``config.seed``
    (:func:`view_seed`). Training passes one made from (seed, epoch, index).
    """
    pixels = _check_pixels(image_to_tensor(image) if isinstance(image, PIL.Image.Image) else image)
    r = _input_size(preprocess)
    n_crops = config.n_views - 1 if config.raw_view else config.n_views
    if seed is None and n_crops and config.randaugment[0]:
        seed = view_seed(pixels, config.seed)  # the crops' and RandAugment's
    boxes = _crops(pixels, n_crops, config, seed).tolist()
    augment = _augmenter(config, seed)

    target = pixels.device if device is None else torch.device(device)
    pixels = _on_device(pixels, target)
    views = torch.empty(config.n_views, 3, r, r, dtype=torch.uint8, device=target)  # [V, 3, R, R]

    if config.raw_view:
        views[0] = _raw_view(pixels, r, preprocess)
    crop_mode = _INTERPOLATIONS[config.crop_interpolation]
    for k, box in enumerate(boxes, start=config.n_views - n_crops):
        views[k] = augment(_crop_view(pixels, box, r, crop_mode))
    return _normalise(views, preprocess)


def _augmenter(config: ViewConfig, seed: int | None):
    """The crops' RandAugment (identity when off): its own generator, seeded from the
    view seed, so the crop boxes are those drawn without it."""
    n, magnitude = config.randaugment
    if not n or seed is None:
        return lambda view: view
    from awt_engine.inputs.randaugment import rand_augment

    digest = hashlib.sha256(f"{VIEW_SEED_VERSION}/randaugment\0{int(seed)}".encode()).digest()
    generator = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return lambda view: rand_augment(view, n, magnitude, generator)


def _input_size(preprocess: PreprocessConfig) -> int:
    if preprocess.interpolation not in _INTERPOLATIONS:
        raise ValueError(
            f"Unknown interpolation {preprocess.interpolation!r}; valid: {', '.join(_INTERPOLATIONS)}"
        )
    r = int(preprocess.size)
    if r < 1:
        raise ValueError(f"preprocess.size must be >= 1, got {r}")
    return r


def _on_device(pixels: torch.Tensor, target: torch.device) -> torch.Tensor:
    """[3, H, W] uint8 -> [1, 3, H, W] on ``target``, channels-last."""
    # Channels-last (HWC in memory, as decoded): torch's CPU uint8 resize kernels run ~1.5x
    # faster on it and give bit-identical values in either layout.
    # non_blocking only into CUDA: the CPU source is freed right after, which an
    # asynchronous copy to MPS can read too late (silently wrong pixels; a PyTorch issue)
    cuda = target.type == "cuda"
    pixels = pixels.to(target, non_blocking=cuda).unsqueeze(0)  # [1, 3, H, W] uint8
    return pixels.contiguous(memory_format=torch.channels_last)


def _raw_view(pixels: torch.Tensor, r: int, preprocess: PreprocessConfig) -> torch.Tensor:
    """View 0: shorter side -> R (aspect kept, longer side truncated as torchvision
    does), then the centre R x R. [1, 3, H, W] -> [3, R, R] uint8."""
    resized = TF.resize(pixels, [r], interpolation=_INTERPOLATIONS[preprocess.interpolation])
    return TF.center_crop(resized, [r, r])[0]


def _crop_view(pixels: torch.Tensor, box, r: int, mode: InterpolationMode) -> torch.Tensor:
    """One crop (top, left, h, w, flip) of [1, 3, H, W], resized to [3, R, R] uint8."""
    top, left, h, w, flip = box
    crop = pixels[:, :, top : top + h, left : left + w]  # [1, 3, h, w]
    view = TF.resize(crop, [r, r], interpolation=mode)[0]  # [3, R, R]
    return view.flip(-1) if flip else view


def _normalise(views: torch.Tensor, preprocess: PreprocessConfig) -> torch.Tensor:
    """uint8 [V, 3, R, R] -> float32, normalised with the model's mean/std."""
    # (x / 255 - mean) / std, as (x - 255 mean) / (255 std): one pass fewer over V x 3 x R x R.
    target = views.device
    shift = torch.tensor(preprocess.mean, dtype=torch.float32, device=target).view(1, 3, 1, 1)
    scale = torch.tensor(preprocess.std, dtype=torch.float32, device=target).view(1, 3, 1, 1)
    return views.float().sub_(shift * 255.0).div_(scale * 255.0)  # [V, 3, R, R]


# --------------------------------------------------------------------------- videos


class _Frames:
    """A video's frames as uint8 RGB tensors [3, H, W], each made when asked and not
    kept: n tensor copies held beside the decoded frames would break the pixel budget
    (400 frames of a 720p clip: 1.1 GB more). Shapes are read without converting."""

    def __init__(self, frames: VideoFrames | Sequence[PIL.Image.Image | torch.Tensor]):
        items = frames.frames if isinstance(frames, VideoFrames) else list(frames)
        if not items:
            raise ValueError("a video needs at least one frame")
        self._items = items
        self.shapes = [_frame_shape(f) for f in items]  # (3, H, W) each, validated

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self._items[i]
        return _check_pixels(image_to_tensor(item) if isinstance(item, PIL.Image.Image) else item)

    def __iter__(self):
        return (self[i] for i in range(len(self._items)))

    @property
    def device(self) -> torch.device:
        first = self._items[0]
        return first.device if isinstance(first, torch.Tensor) else torch.device("cpu")


def _frame_shape(frame: PIL.Image.Image | torch.Tensor) -> tuple[int, int, int]:
    if not isinstance(frame, PIL.Image.Image):
        return tuple(_check_pixels(frame).shape)
    if frame.width < 1 or frame.height < 1:
        raise ValueError(f"image is empty: shape (3, {frame.height}, {frame.width})")
    return 3, frame.height, frame.width


def _frame_pixels(frames: VideoFrames | Sequence[PIL.Image.Image | torch.Tensor]) -> _Frames:
    return _Frames(frames)


def video_view_seed(frames: Sequence[torch.Tensor], seed: int) -> int:
    """A 63-bit generator seed from ``seed`` and every frame's shape and pixel bytes
    (HWC order, as :func:`view_seed` hashes one image), under its own version string."""
    h = hashlib.sha256(VIDEO_SEED_VERSION.encode() + b"\0")
    h.update(f"{int(seed)}\0{len(frames)}\0".encode())
    for frame in frames:
        pixels = _check_pixels(frame).detach().to("cpu")
        h.update(f"{'x'.join(map(str, pixels.shape))}\0".encode())
        h.update(pixels.permute(1, 2, 0).contiguous().numpy().data)
    return int.from_bytes(h.digest()[:8], "little") >> 1


def _video_boxes(pixels: _Frames, config: ViewConfig, seed: int | None) -> torch.Tensor:
    """int64 [V, 6]: (frame, top, left, height, width, flipped) of each video view."""
    n = len(pixels)
    rows = []
    n_frame_views = min(n, config.n_views) if config.raw_view else 0
    middle = n // 2
    for i in ([middle, *(i for i in range(n) if i != middle)])[:n_frame_views]:
        _, height, width = pixels.shapes[i]
        side = min(height, width)
        rows.append([i, (height - side) // 2, (width - side) // 2, side, side, 0])
    n_crops = config.n_views - n_frame_views
    if n_crops:
        if seed is None:
            seed = video_view_seed(pixels, config.seed)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        for _ in range(n_crops):  # frame, then its box: crop k does not depend on V
            i = int(torch.randint(0, n, (1,), generator=generator, device="cpu").item())
            _, height, width = pixels.shapes[i]
            box = crop_boxes(height, width, 1, config, generator)[0].tolist()
            rows.append([i, *box])
    return torch.tensor(rows, dtype=torch.int64, device="cpu").view(-1, 6)


def video_view_boxes(
    frames: VideoFrames | Sequence[PIL.Image.Image | torch.Tensor],
    config: ViewConfig = ViewConfig(),
    *,
    seed: int | None = None,
) -> torch.Tensor:
    """Where each of :func:`make_video_views`' views comes from: int64 [V, 6], columns
    (frame index, top, left, height, width, flipped), the very boxes it draws. A frame
    view's box is the centre square the shorter-side resize keeps."""
    return _video_boxes(_frame_pixels(frames), config, seed)


def make_video_views(
    frames: VideoFrames | Sequence[PIL.Image.Image | torch.Tensor],
    preprocess: PreprocessConfig,
    config: ViewConfig = ViewConfig(),
    *,
    seed: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The V views of one video, float32 [V, 3, R, R] (the module docstring says which).

    ``frames``: a :class:`~awt_engine.inputs.frames.VideoFrames` or its frames (PIL images or
    uint8 RGB tensors [3, H, W]) in time order. ``seed`` seeds the crop draws directly;
    None derives it from all the frames' pixels and ``config.seed``
    (:func:`video_view_seed`), so the views depend only on the frames and the settings.
    """
    pixels = _frame_pixels(frames)
    r = _input_size(preprocess)
    boxes = _video_boxes(pixels, config, seed).tolist()
    target = pixels.device if device is None else torch.device(device)
    views = torch.empty(len(boxes), 3, r, r, dtype=torch.uint8, device=target)  # [V, 3, R, R]
    crop_mode = _INTERPOLATIONS[config.crop_interpolation]
    n_frame_views = min(len(pixels), config.n_views) if config.raw_view else 0
    uses: dict[int, list[int]] = {}  # frame -> its views, frames in order of first use
    for k, (i, *_) in enumerate(boxes):
        uses.setdefault(i, []).append(k)
    for i, ks in uses.items():  # one frame's pixels at a time: all its views, then free
        frame = _on_device(pixels[i], target)
        for k in ks:
            if k < n_frame_views:
                views[k] = _raw_view(frame, r, preprocess)
            else:
                views[k] = _crop_view(frame, boxes[k][1:], r, crop_mode)
        del frame
    return _normalise(views, preprocess)
