"""Decode -> views -> batches: the one input loop that classify, eval and training share.

:func:`view_batches` takes any stream of inputs (paths, PIL images, numpy arrays, torch
tensors; video files too), decodes them on a thread pool (huge images reduced to what the
views need, decoded pixels bounded by a budget: :mod:`awt_engine.inputs.decode`; a video's
``view_config.frames`` sampled frames: :mod:`awt_engine.inputs.video`), makes each image's or
video's views (:mod:`awt_engine.inputs.views`) and yields them ``batch_size`` inputs at a time,
with a :class:`Failure` for each input that could not be used. Nothing is ever dropped
silently, and nothing about a batch changes any image's views: they depend only on the
image, the view settings and the seed (or the per-item seed training gives).

Training takes its batches from here too: one :func:`view_batches` call per step, with a
:class:`DecodedCache` (decoded images kept across epochs) and ``seed_for`` giving each
item's seed from (seed, epoch, index).

Axes: b images in a batch, V views, R the model's input size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from awt_engine.inputs.base import DEFAULT_PIXEL_BUDGET, DecodedImage
from awt_engine.inputs.decode import decode_images
from awt_engine.inputs.views import ViewConfig, make_video_views, make_views
from awt_engine.models.base import PreprocessConfig


class DecodedCache:
    """Decoded (RGB, reduced for the views' size) images, by path, in memory up to
    ``budget`` bytes; beyond it images are decoded again when needed. Training keeps one
    across its epochs (a few-shot set usually fits)."""

    def __init__(self, target_size: int, budget: int = 2 << 30):
        self.target_size = target_size  # R: huge images are decoded reduced for it
        self.budget = budget  # 2 GiB of RGB pixels: ~10k ImageNet-sized photos
        self.used = 0
        self._images: dict[str, Image.Image] = {}

    def decode(self, paths: Iterable[Any], workers: int = 2) -> list[DecodedImage]:
        """One :class:`DecodedImage` per path, in order: cached ones as they are, the
        others decoded (videos refused, as training takes images) and kept while the
        budget lasts."""
        paths = [os.fspath(p) for p in paths]
        todo = [p for p in paths if p not in self._images]
        fresh: dict[str, DecodedImage] = {}
        for item in decode_images(todo, workers=workers, target_size=self.target_size):
            fresh[item.path] = item
            if not item.ok:
                continue
            size = item.image.width * item.image.height * 3
            if self.used + size <= self.budget:
                self._images[item.path] = item.image
                self.used += size
        return [
            DecodedImage(p, self._images[p], None) if p in self._images else fresh[p] for p in paths
        ]


@dataclass(frozen=True)
class Failure:
    """An input that could not be used: its position, its name and why."""

    index: int  # position in the input stream
    source: str  # the path, or "<input N>" for in-memory images
    reason: str


@dataclass(frozen=True)
class ViewBatch:
    """The views of up to ``batch_size`` images, in input order."""

    indices: tuple[int, ...]  # positions in the input stream
    sources: tuple[str, ...]
    views: Tensor  # [b, V, 3, R, R] normalised pixels

    def __len__(self) -> int:
        return len(self.indices)


def view_batches(
    inputs: Iterable[Any],
    preprocess: PreprocessConfig,
    view_config: ViewConfig = ViewConfig(),
    *,
    batch_size: int = 4,
    workers: int = 2,
    device: torch.device | str | None = None,
    seed_for: Callable[[int], int] | None = None,
    pixel_budget: int | None = DEFAULT_PIXEL_BUDGET,
    cache: DecodedCache | None = None,
) -> Iterator[ViewBatch | Failure]:
    """Yield a :class:`ViewBatch` per ``batch_size`` usable inputs and a :class:`Failure`
    per unusable one (as soon as it is found), in input order within each kind.

    ``seed_for(index)`` gives the crop seed of the input at ``index`` (training: from
    seed, epoch and index); None derives it from each image's pixels and the view seed.
    ``cache``: decode file paths through it (training: images kept across epochs; its
    ``target_size`` is the model's R) instead of a fresh decode.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    indices: list[int] = []
    sources: list[str] = []
    views: list[Tensor] = []

    def flush() -> ViewBatch:
        batch = ViewBatch(tuple(indices), tuple(sources), torch.stack(views))  # [b,V,3,R,R]
        indices.clear()
        sources.clear()
        views.clear()
        return batch

    decoded = _decoded(inputs, preprocess.size, view_config.frames, workers, pixel_budget, cache)
    for index, item in enumerate(decoded):
        if not item.ok:
            yield Failure(index, item.path, item.error)
            continue
        try:
            seed = None if seed_for is None else seed_for(index)
            make = make_video_views if item.is_video else make_views
            v = make(item.image, preprocess, view_config, device=device, seed=seed)
        except Exception as exc:  # a decodable image the view code cannot use
            yield Failure(index, item.path, f"cannot make views: {exc}")
            continue
        indices.append(index)
        sources.append(item.path)
        views.append(v)
        del item  # the decoded pixels are not kept past their views
        if len(indices) == batch_size:
            yield flush()
    if indices:
        yield flush()


def _decoded(
    inputs: Iterable[Any],
    size: int,
    frames: int,
    workers: int,
    pixel_budget: int | None,
    cache: DecodedCache | None,
) -> Iterable[DecodedImage]:
    """The inputs decoded for views of ``size`` R, in order: through ``cache`` when given
    (images only), else on the budgeted scheduler (videos as ``frames`` sampled frames)."""
    if cache is not None:
        return cache.decode(inputs, workers=workers)
    return decode_images(
        inputs, workers=workers, target_size=size, pixel_budget=pixel_budget, frames=frames
    )
