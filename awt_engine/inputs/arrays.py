"""In-memory inputs: PIL images, numpy arrays and torch tensors as RGB images, with the
same conversion and huge-image rules as files (:mod:`awt_engine.inputs.pil`). torch is
never imported here: a tensor is recognised only when torch is already loaded.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
from PIL import Image

from awt_engine.inputs.base import (
    DEFAULT_MAX_PIXELS,
    EncodedImage,
    ImageDecodeError,
    check_target_size,
    reduction_factor,
    short_detail,
)
from awt_engine.inputs.pil import finish, load_image, to_rgb


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
    check_target_size(target_size)
    if isinstance(obj, (str, os.PathLike, EncodedImage)):
        return load_image(obj, max_pixels=max_pixels, target_size=target_size)
    if isinstance(obj, Image.Image):
        label = getattr(obj, "filename", "") or "<PIL image>"
        try:
            obj.load()
            return finish(obj, target_size)
        except Exception as exc:
            raise ImageDecodeError(label, f"cannot read image ({short_detail(exc)})") from None
    if _is_torch_tensor(obj):
        obj = _tensor_to_array(obj)
    if isinstance(obj, np.ndarray):
        image = _array_to_rgb(obj)
        factor = reduction_factor(image.size, target_size)
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
    return to_rgb(Image.fromarray(np.ascontiguousarray(data)))
