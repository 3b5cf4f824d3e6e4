"""Decode -> views -> batches: the one input loop that classify, eval and training share.

:func:`view_batches` takes any stream of inputs (paths, PIL images, numpy arrays, torch
tensors; video files too), decodes them on a thread pool (huge images reduced to what the
views need, decoded pixels bounded by a budget: :mod:`awt_engine.images`; a video's
``view_config.frames`` sampled frames: :mod:`awt_engine.video`), makes each image's or
video's views (:mod:`awt_engine.views`) and yields them ``batch_size`` inputs at a time,
with a :class:`Failure` for each input that could not be used. Nothing is ever dropped
silently, and nothing about a batch changes any image's views: they depend only on the
image, the view settings and the seed (or the per-item seed training gives).

Axes: b images in a batch, V views, R the model's input size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from awt_engine.images import DEFAULT_PIXEL_BUDGET, decode_images
from awt_engine.models.base import PreprocessConfig
from awt_engine.views import ViewConfig, make_video_views, make_views


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
) -> Iterator[ViewBatch | Failure]:
    """Yield a :class:`ViewBatch` per ``batch_size`` usable inputs and a :class:`Failure`
    per unusable one (as soon as it is found), in input order within each kind.

    ``seed_for(index)`` gives the crop seed of the input at ``index`` (training: from
    seed, epoch and index); None derives it from each image's pixels and the view seed.
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

    decoded = decode_images(
        inputs,
        workers=workers,
        target_size=preprocess.size,
        pixel_budget=pixel_budget,
        frames=view_config.frames,
    )
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
