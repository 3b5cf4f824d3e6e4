"""The embedding interface every model sits behind, so one scorer serves all of them.

Two kinds of model feed the scorers (:mod:`awt_engine.scorers`):

* an :class:`Embedder` turns views ``[B, V, 3, R, R]`` into view embeddings
  ``[B, V, D]`` and a :class:`~awt_engine.labels.LabelSet` into class-prompt embeddings
  ``[C, P, D]`` (zero-shot CLIP, CoOp, LAMM, the AWT adapter, LLaMP, CLAMP);
* a :class:`LogitModel` gives view-class-prompt logits ``[B, V, C, P]`` directly, for
  models without a joint embedding space (eP-ALM, which scores texts generatively).

Rules every model follows:

* Prompts are the model's own business: it gets the label set (classes, template,
  descriptions), not prompt strings, because CoOp, LAMM, LLaMP and CLAMP each assemble
  prompts their own way. Prompt 0 of every class is the bare template (so AWT's prompt
  weights stay defined); prompt p >= 1 adds description p.
* Embeddings are L2-normalised; logits are ``logit_scale * similarity`` with similarity
  in about [-1, 1] (the transport cost is ``1 - similarity``).
* Gradients: a model computes with autograd when ``torch.is_grad_enabled()``, so the
  same calls serve training; inference wraps them in ``torch.inference_mode()``.
* ``identity`` names the base model and weights plus a hash of any learned tensors.
  It keys every cache, so a cache never serves an entry computed before training moved
  the weights.

Axes: B images, V views (view 0 the un-augmented image), C classes, P prompts, D width.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor

if TYPE_CHECKING:
    from awt_engine.labels import LabelSet


@dataclass(frozen=True)
class PreprocessConfig:
    """How pixels must be prepared for the model, as read from the model itself."""

    size: int  # R: the square input size, pixels
    mean: tuple[float, float, float]  # per-channel mean of [0, 1] RGB values
    std: tuple[float, float, float]  # per-channel std of [0, 1] RGB values
    interpolation: str  # "bicubic" | "bilinear": the model's resize interpolation


@dataclass(frozen=True)
class TrainedInfo:
    """The checkpoint a model was loaded from (:func:`awt_engine.models.factory.load_model`).

    Models declare it as their ``checkpoint`` field (``None`` when not loaded from a
    checkpoint: zero-shot CLIP, a model being trained); read it with
    :func:`trained_info`, which also answers ``None`` for a user's model that lacks it.
    """

    path: Path  # the checkpoint file
    # its checked header (awt_engine.checkpoints.check_header): method, method_config,
    # backbone, labels (classes, template, descriptions), shots, seed, ...
    header: Mapping[str, Any]


def trained_info(model) -> TrainedInfo | None:
    """The checkpoint ``model`` was loaded from, None for one not loaded from a checkpoint."""
    info = getattr(model, "checkpoint", None)
    return info if isinstance(info, TrainedInfo) else None


@runtime_checkable
class Embedder(Protocol):
    identity: str  # base model + weights + hash of learned tensors: keys every cache
    logit_scale: float  # multiplier on cosine similarity (CLIP's logit_scale.exp())
    preprocess: PreprocessConfig
    device: torch.device

    def embed_views(self, views: Tensor) -> Tensor:
        """[B, V, 3, R, R] normalised pixels -> [B, V, D] L2-normalised."""
        ...

    def class_embeddings(self, labels: LabelSet) -> Tensor:
        """A label set -> [C, P, D] L2-normalised; P = labels.n_prompts, prompt 0 bare."""
        ...


@runtime_checkable
class LogitModel(Protocol):
    identity: str
    logit_scale: float  # logits = logit_scale * similarity
    preprocess: PreprocessConfig
    device: torch.device

    def logits(self, views: Tensor, labels: LabelSet) -> Tensor:
        """[B, V, 3, R, R] and a label set -> logits [B, V, C, P]."""
        ...


def is_embedder(model) -> bool:
    """Whether ``model`` gives embeddings (else it is a :class:`LogitModel`)."""
    return isinstance(model, Embedder)


def check_model(model) -> None:
    """TypeError unless ``model`` implements one of the two interfaces."""
    if not isinstance(model, Embedder | LogitModel):
        missing = [
            a for a in ("identity", "logit_scale", "preprocess", "device") if not hasattr(model, a)
        ]
        raise TypeError(
            f"{type(model).__name__} is neither an Embedder (embed_views, class_embeddings) "
            f"nor a LogitModel (logits)"
            + (f"; it also lacks {', '.join(missing)}" if missing else "")
        )


def tensors_sha256(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over named tensors (names, dtypes, shapes and bytes), order-independent."""
    h = hashlib.sha256(b"awt-engine/tensors/v1\0")
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def learned_identity(base_identity: str, method: str, tensors: Mapping[str, Tensor]) -> str:
    """The identity of a model with learned tensors: the frozen base's identity, the
    method, and a hash of the tensors, so any change of a learned value changes it."""
    return f"{base_identity}|{method}:sha256:{tensors_sha256(tensors)[:24]}"
