"""Zero-shot CLIP behind the :class:`~awt_engine.models.base.Embedder` interface.

Views go through the backbone's image tower; a label set becomes CLIP text prompts
(:meth:`~awt_engine.labels.LabelSet.prompt_texts`: the bare template sentence, then
the sentence plus each description) through its text tower. Nothing is learned, so
the identity is the backbone's (weights and compute precision).
"""

from __future__ import annotations

import torch
from torch import Tensor

from awt_engine.labels import LabelSet
from awt_engine.models.base import PreprocessConfig, TrainedInfo


class ClipEmbedder:
    """An open_clip backbone (:class:`~awt_engine.backbone.ClipBackbone`) as an Embedder."""

    checkpoint: TrainedInfo | None = None  # zero-shot: never loaded from a checkpoint

    def __init__(self, backbone, *, text_batch_size: int = 256):
        self.backbone = backbone
        # fp16 and fp32 forward passes give different embeddings: keep them apart in caches
        # (int8 towers too: backbone.precision names them)
        self.precision = getattr(backbone, "precision", None) or str(
            getattr(backbone, "dtype", "")
        ).removeprefix("torch.")
        self.identity = f"{backbone.identity}|{self.precision}"
        self.logit_scale = float(backbone.logit_scale)
        self.preprocess: PreprocessConfig = backbone.preprocess
        self.device: torch.device = backbone.device
        self.weights = getattr(backbone, "weights", None)  # what was loaded, for records
        self.dim = getattr(backbone, "embed_dim", None)
        self.text_batch_size = text_batch_size
        self.text_progress = False  # a progress bar over long text encodes (set by callers)

    def embed_views(self, views: Tensor) -> Tensor:
        """[B, V, 3, R, R] -> [B, V, D]."""
        B, V = views.shape[:2]
        flat = self.backbone.encode_images(views.flatten(0, 1))  # [B*V, D]
        return flat.view(B, V, -1)

    def class_embeddings(self, labels: LabelSet) -> Tensor:
        """[C, P, D] from the label set's CLIP text prompts."""
        prompts = labels.prompt_texts()
        flat = [t for row in prompts for t in row]
        out = self.backbone.encode_text(
            flat, batch_size=self.text_batch_size, progress=self.text_progress
        )  # [C*P, D]
        return out.view(labels.n_classes, labels.n_prompts, -1)
