"""The embedding interface every method sits behind, and its CLIP implementation.

Two kinds of model feed the one scorer:

* an :class:`Embedder` gives image-view embeddings ``[B, V, D]`` and class-prompt
  embeddings ``[C, P, D]`` (zero-shot CLIP; trainable prompt methods such as CoOp,
  LAMM, LLaMP, CLAMP and the AWT adapter return the same tensors, with gradients
  when training);
* a :class:`LogitModel` gives view-prompt-class logits ``[B, V, P, C]`` directly (a
  generative method such as eP-ALM).

:func:`score_views` takes either and returns ``[B, C]`` through :mod:`awt_engine.scoring`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from awt_engine import scoring
from awt_engine.text_cache import load_or_encode


@runtime_checkable
class Embedder(Protocol):
    identity: str  # names model + weights; keys the text-embedding cache
    logit_scale: float  # multiplier on cosine similarity
    preprocess: object  # backbone.PreprocessConfig: size, mean, std, interpolation
    device: torch.device

    def embed_views(self, views: Tensor) -> Tensor:
        """[B, V, 3, R, R] normalised pixels -> [B, V, D] L2-normalised."""
        ...

    def embed_prompts(self, prompts: Sequence[Sequence[str]]) -> Tensor:
        """[C][P] prompt strings -> [C, P, D] L2-normalised."""
        ...


@runtime_checkable
class LogitModel(Protocol):
    identity: str
    logit_scale: float  # logits = logit_scale * similarity (the transport cost uses it)
    preprocess: object
    device: torch.device

    def view_prompt_logits(self, views: Tensor, prompts: Sequence[Sequence[str]]) -> Tensor:
        """[B, V, 3, R, R] and [C][P] prompts -> logits [B, V, P, C]."""
        ...


class ClipEmbedder:
    """An open_clip backbone behind the :class:`Embedder` interface."""

    def __init__(self, backbone, *, cache_root: Path | None = None, text_batch_size: int = 256):
        self.backbone = backbone
        # fp16 and fp32 forward passes give different embeddings: keep them apart in caches
        self.identity = f"{backbone.identity}|{str(backbone.dtype).removeprefix('torch.')}"
        self.logit_scale = float(backbone.logit_scale)
        self.preprocess = backbone.preprocess
        self.device = backbone.device
        self.weights = getattr(backbone, "weights", None)  # what was loaded, for records
        self.cache_root = cache_root
        self.text_batch_size = text_batch_size

    def embed_views(self, views: Tensor) -> Tensor:
        B, V = views.shape[:2]
        flat = self.backbone.encode_images(views.flatten(0, 1))  # [B*V, D]
        return flat.view(B, V, -1)

    def embed_prompts(self, prompts: Sequence[Sequence[str]]) -> Tensor:
        return load_or_encode(
            lambda texts: self.backbone.encode_text(texts, batch_size=self.text_batch_size),
            self.identity,
            prompts,
            self.cache_root,
            dim=getattr(self.backbone, "embed_dim", None),
        )


def score_views(
    model: Embedder | LogitModel,
    method: str,
    *,
    image_embeds: Tensor | None = None,
    class_embeds: Tensor | None = None,
    logits: Tensor | None = None,
    awt_config: scoring.AWTConfig | None = None,
    memory_budget: int | None = None,
) -> Tensor:
    """Scores [B, C] by ``method`` from embeddings or from [B, V, P, C] logits."""
    scoring.check_method(method)
    scale = float(model.logit_scale)
    if logits is not None:
        sims = logits.permute(0, 1, 3, 2)  # [B,V,C,P]
        if method == "clip":
            return sims[:, 0, :, 0]
        if method == "clip-descriptions":
            return sims[:, 0].mean(-1)
        weighting, transport = scoring.AWT_VARIANTS[method]
        return scoring.awt_scores_from_logits(
            sims,
            scale,
            config=awt_config,
            weighting=weighting,
            transport=transport,
            memory_budget=memory_budget,
        ).scores
    assert image_embeds is not None and class_embeds is not None
    return scoring.score(
        method,
        image_embeds.to(class_embeds.device),
        class_embeds,
        scale,
        config=awt_config,
        memory_budget=memory_budget,
    )


def views_needed(method: str, n_views: int) -> int:
    """The baselines look at the raw view only."""
    return 1 if method in ("clip", "clip-descriptions") else n_views


def prompts_needed(method: str, prompts: list[list[str]]) -> list[list[str]]:
    """Zero-shot CLIP uses the bare prompt only: no need to encode the rest."""
    return [p[:1] for p in prompts] if method == "clip" else prompts
