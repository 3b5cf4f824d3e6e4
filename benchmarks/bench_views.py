"""View making speed: ms per image for V views at R x R from a W x H image.

Rows: the steps of ``make_views`` (RGB conversion to a tensor, the content hash that
seeds the crops, the crop sampling) and the whole call, against the per-crop PIL
pipeline that torchvision transforms run (what the AWT paper's code does: PIL
RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize, once per view).

    uv run python benchmarks/bench_views.py [--device cuda] [--views 51] [--size 224]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import hardware, print_table, timeit, today

from awt_engine.backbone import PreprocessConfig
from awt_engine.inputs.views import ViewConfig, crop_boxes, image_to_tensor, make_views, view_seed

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def photo_like(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255.0 / width, yy * 255.0 / height, ((xx + yy) % 61) * 4.0], -1)
    return PIL.Image.fromarray(
        np.clip(base + rng.normal(0, 15, base.shape), 0, 255).astype(np.uint8)
    )


def pil_pipeline(pp: PreprocessConfig, n_views: int):
    """torchvision's PIL transforms, one call per view (the usual test-time augmentation)."""
    view0 = T.Compose(
        [
            T.Resize(pp.size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(pp.size),
            T.ToTensor(),
            T.Normalize(pp.mean, pp.std),
        ]
    )
    crop = T.Compose(
        [
            T.RandomResizedCrop(pp.size, scale=(0.08, 1.0)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(pp.mean, pp.std),
        ]
    )
    return lambda img: torch.stack([view0(img)] + [crop(img) for _ in range(n_views - 1)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--views", type=int, default=51)
    ap.add_argument("--size", type=int, default=224, help="model input size R")
    ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()

    device = torch.device(args.device)
    pp = PreprocessConfig(args.size, OPENAI_MEAN, OPENAI_STD, "bicubic")
    cfg = ViewConfig(n_views=args.views)
    img = photo_like(args.width, args.height)
    pixels = image_to_tensor(img)
    h, w = pixels.shape[1:]

    def ms(fn) -> str:
        return f"{timeit(fn, repeat=args.repeat, warmup=2, device=device) * 1e3:.2f}"

    rows = [
        ["image_to_tensor (PIL -> uint8 [3,H,W])", ms(lambda: image_to_tensor(img))],
        ["view_seed (SHA-256 of the pixels)", ms(lambda: view_seed(pixels, 0))],
        [
            f"crop_boxes ({args.views - 1} crops)",
            ms(lambda: crop_boxes(h, w, args.views - 1, cfg, torch.Generator().manual_seed(0))),
        ],
        ["make_views from a uint8 tensor", ms(lambda: make_views(pixels, pp, cfg, device=device))],
        ["**make_views from a PIL image**", ms(lambda: make_views(img, pp, cfg, device=device))],
    ]
    if device.type == "cpu":
        rows.append(
            ["torchvision PIL transforms, per view", ms(lambda: pil_pipeline(pp, args.views)(img))]
        )
    print_table(
        f"Views: ms per image ({today()})",
        ["step", "ms / image"],
        rows,
        notes=[
            f"hardware: {hardware(device)}",
            f"image {args.width} x {args.height} RGB, V = {args.views} views at R = {args.size}, "
            f"device {device}",
            f"best of {args.repeat} runs after 2 warm-up runs",
        ],
    )


if __name__ == "__main__":
    main()
