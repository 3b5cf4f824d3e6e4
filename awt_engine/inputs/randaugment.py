"""RandAugment as ALBEF's ``RandomAugment`` does it (eP-ALM trains with it), on uint8 tensors,
every draw from a seeded generator (docs/design.md section 2.1).

eP-ALM's training transform (mshukor/eP-ALM @ 9ecfeb9acf, ``dataset/caption.py:54-60``):
``RandomResizedCrop(224, scale=(0.5, 1.0), bicubic)``, ``RandomHorizontalFlip``, then
``RandomAugment(2, 7, augs=[Identity, AutoContrast, Equalize, Brightness, Sharpness,
ShearX, ShearY, TranslateX, TranslateY, Rotate])`` (``dataset/randaugment.py``): N ops drawn
with replacement, each applied with probability 0.5 at magnitude M of 10 (enhancements
by a factor ``M / 10 * 1.8 + 0.1``; shears ``M / 10 * 0.3``, translations ``M / 10 * 10``
pixels and rotations ``M / 10 * 30`` degrees, each of a random sign; grey (128) fill).

Here the draws come in ALBEF's order (the N op choices, then per op its coin and, for the
signed ones, its sign) from the view's own generator, never the global RNG (ALBEF draws
from numpy's global one), so views stay reproducible by their seed. The pixel ops are
torchvision's (ALBEF's are its own OpenCV/numpy versions: the same operations, pixels may
differ by rounding; shears here are about the top-left corner, as ALBEF's affine matrix).

Axes: R input size.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

# ALBEF's op list as eP-ALM passes it (dataset/caption.py:57-58)
OPS = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
MAX_LEVEL = 10  # dataset/randaugment.py: MAX_LEVEL
_FILL = [128.0, 128.0, 128.0]  # replace_value
_SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}
_BILINEAR = InterpolationMode.BILINEAR


def _coin(generator: torch.Generator) -> float:
    return float(torch.rand(1, generator=generator, device="cpu").item())


def draw_ops(n: int, magnitude: int, generator: torch.Generator) -> list[tuple[str, float]]:
    """The applied ops of one view: (name, signed level) each, drawn in ALBEF's order (the
    ``n`` choices with replacement, then per op its 0.5 coin and, if applied and signed,
    its sign). Levels: ALBEF's ``*_level_to_args`` at ``magnitude``."""
    picks = torch.randint(0, len(OPS), (n,), generator=generator, device="cpu").tolist()
    out = []
    for k in picks:
        name = OPS[k]
        if _coin(generator) > 0.5:  # ALBEF: `if np.random.random() > prob: continue`
            continue
        m = magnitude / MAX_LEVEL
        if name in ("Brightness", "Sharpness"):
            level = m * 1.8 + 0.1
        elif name.startswith("Shear"):
            level = m * 0.3
        elif name.startswith("Translate"):
            level = m * 10.0  # translate_const pixels
        elif name == "Rotate":
            level = m * 30.0
        else:
            level = 0.0
        if name in _SIGNED and _coin(generator) > 0.5:
            level = -level
        out.append((name, level))
    return out


def apply_op(view: torch.Tensor, name: str, level: float) -> torch.Tensor:
    """One op on a uint8 view [3, R, R] -> [3, R, R]."""
    if name == "AutoContrast":
        return TF.autocontrast(view)
    if name == "Equalize":
        return TF.equalize(view)
    if name == "Brightness":
        return TF.adjust_brightness(view, level)
    if name == "Sharpness":
        return TF.adjust_sharpness(view, level)
    if name in ("ShearX", "ShearY"):
        deg = math.degrees(math.atan(level))
        shear = [deg, 0.0] if name == "ShearX" else [0.0, deg]
        return TF.affine(view, angle=0.0, translate=[0, 0], scale=1.0, shear=shear,
                         interpolation=_BILINEAR, fill=_FILL, center=[0, 0])  # fmt: skip
    if name in ("TranslateX", "TranslateY"):
        shift = [round(level), 0] if name == "TranslateX" else [0, round(level)]
        return TF.affine(view, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0],
                         interpolation=_BILINEAR, fill=_FILL)  # fmt: skip
    if name == "Rotate":
        return TF.rotate(view, level, interpolation=_BILINEAR, fill=_FILL)
    return view  # Identity


def rand_augment(
    view: torch.Tensor, n: int, magnitude: int, generator: torch.Generator
) -> torch.Tensor:
    """ALBEF's RandomAugment(n, magnitude) on a uint8 view [3, R, R] -> [3, R, R]."""
    for name, level in draw_ops(n, magnitude, generator):
        view = apply_op(view, name, level)
    return view
