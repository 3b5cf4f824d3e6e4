"""CLIP-LoRA: low-rank updates of q, k and v in every layer of both CLIP towers
(Zanella and Ben Ayed, Low-Rank Few-Shot Adaptation of Vision-Language Models, CVPR
Workshops 2024; official code ``MaxZanella/CLIP-LoRA``).

What learns: in each residual block of the text and the vision transformer, a LoRA of
rank r on the query, key and value projections of the attention (the fused
``in_proj_weight`` [3W, W] of open_clip, adapted by :class:`FusedQVLoRA` with blocks
q, k, v), the update ``(alpha / sqrt(r)) * B @ A`` (``loralib/layers.py``: the code
scales by ``alpha / sqrt(r)``, not LoRA's ``alpha / r``). ``B`` starts at zero, so the
model starts as frozen CLIP. Loss: cross-entropy of ``logit_scale * cos(image, class)``
(CLIP's scale, frozen: the code fixes 100, pretrained CLIP's value), the class text one
template for every class, "a photo of a {}." (the code's ``dataset.template[0]``).

Class embeddings come from the LoRA'd text tower, image embeddings from the LoRA'd
vision tower, so the model is an Embedder: every scorer (``--scorer awt`` too) reads it.
Prompts with descriptions (for AWT) are the template sentence plus the description,
through the same adapted tower; CLIP-LoRA never saw those in training (an extension).

In training the LoRA branch reads a dropped-out input (p = 0.25, as the code's
``LinearLoRA``): the attention runs :func:`lora_attention`
(:mod:`awt_engine.methods._clip_lora_attention`); at evaluation the update is folded into
the weight (:func:`fused_lora_attached`), the same function without dropout. Not
reproduced: the per-iteration cosine (the engine's schedule steps per epoch, annealed to
1e-6 as torch's ``CosineAnnealingLR(eta_min=1e-6)``).

Axes: B images, C classes, P prompts, D embedding width, W tower width, r rank.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from awt_engine.labels import LabelSet
from awt_engine.methods._clip_lora_attention import dropout_lora_attached
from awt_engine.methods.base import (
    LossOutput,
    MethodSpec,
    TrainableModel,
    TrainBatch,
    option,
)
from awt_engine.methods.train_config import TrainConfig
from awt_engine.models.lora import FusedQVLoRA, fused_lora_attached, has_fused_qkv

QKV = (0, 1, 2)  # row blocks of in_proj_weight: q, k, v (run_utils.py --params q k v)


@dataclass(frozen=True)
class ClipLoRAConfig:
    # run_utils.py --r 2
    rank: int = option(2, "LoRA rank (CLIP-LoRA: 2)", bounds=(1, 1024))
    # run_utils.py --alpha 1; loralib/layers.py scales by alpha / sqrt(r)
    alpha: float = option(1.0, "LoRA alpha; the update is scaled by alpha / sqrt(rank)")
    # run_utils.py --dropout_rate 0.25: on the LoRA branch's input, in training
    dropout: float = option(0.25, "dropout on the LoRA branch's input in training")
    # datasets/*.py: template = ['a photo of a {}.'] for every data set
    template: str = option("a photo of a {}.", 'class prompt ("" = the label set\'s own template)')

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a whole number >= 1, got {self.rank!r}")
        if not (isinstance(self.alpha, int | float) and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a finite number, got {self.alpha!r}")
        if not (isinstance(self.dropout, int | float) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.template and "{}" not in self.template:
            raise ValueError(f"template must hold {{}} for the class name, got {self.template!r}")


# the code's iterations per shot (run_utils.py --n_iters 500; lora.py total_iters =
# n_iters * shots) and batch (--batch_size 32)
ITERS_PER_SHOT, BATCH = 500, 32
UNKNOWN_CLASSES = 100  # a data set with no registered class list: epochs as for 100 classes


def clip_lora_train_defaults(shots: int, dataset: str | None) -> TrainConfig:
    """CLIP-LoRA's training (lora.py, run_utils.py): AdamW lr 2e-4, weight decay 1e-2,
    betas (0.9, 0.999), batch 32, cosine to 1e-6 with no warm-up, ``500 * shots``
    iterations, here in epochs of ``ceil(shots * C / 32)`` steps (C: the data set's
    registered class count, else 100)."""
    C = UNKNOWN_CLASSES
    if dataset:
        from awt_engine.registry import get_dataset

        try:
            classes = get_dataset(dataset).classes
        except ValueError:
            classes = None
        C = len(classes) if classes else C
    steps = math.ceil(shots * C / BATCH)
    epochs = max(1, round(ITERS_PER_SHOT * shots / steps))
    return TrainConfig(
        epochs=epochs,
        lr=2e-4,
        batch_size=BATCH,
        optimizer="adamw",
        weight_decay=1e-2,
        betas=(0.9, 0.999),
        warmup_epochs=0,
        warmup="none",
        min_lr=1e-6,  # lora.py CosineAnnealingLR eta_min: annealed to, not a clamp
        min_lr_mode="anneal",
    )


class ClipLoRA(TrainableModel):
    method = "clip-lora"
    int8_refusal = "its LoRA changes the q, k and v weights of every block of both towers"

    def __init__(self, backbone, config):
        super().__init__(backbone, config)
        self._blocks = {"text": backbone.text_blocks, "vision": backbone.vision_blocks}
        for tower, blocks in self._blocks.items():
            if not all(has_fused_qkv(b.attn) for b in blocks.blocks):
                raise ValueError(
                    f"clip-lora: the {tower} tower's attention has no fused q/k/v weight "
                    "(open_clip's nn.MultiheadAttention) to adapt"
                )

    def prepare(self, labels: LabelSet, seed: int = 0) -> None:
        super().prepare(labels, seed)
        cfg = self.config
        g = torch.Generator().manual_seed(seed)
        scale = cfg.alpha / math.sqrt(cfg.rank)  # loralib/layers.py LoRALayer.scaling

        def adapters(tower: str) -> nn.ModuleList:
            return nn.ModuleList(
                FusedQVLoRA(
                    b.attn.in_proj_weight.shape[1], cfg.rank, cfg.alpha, g, blocks=QKV, scale=scale
                )
                for b in self._blocks[tower].blocks
            ).to(self.device)

        self.text_lora = adapters("text")  # text first, then vision: one draw order
        self.vision_lora = adapters("vision")

    def _adapted(self, tower: str) -> AbstractContextManager:
        """The LoRA on ``tower``'s attentions for one forward: with dropout on the branch
        input in training, folded into the weights otherwise."""
        if not hasattr(self, f"{tower}_lora"):
            raise RuntimeError(f"{self.method}: call prepare(labels) before using the model")
        loras = getattr(self, f"{tower}_lora")
        pairs = [(b.attn, lora) for b, lora in zip(self._blocks[tower].blocks, loras, strict=True)]
        if self.training and self.config.dropout > 0:
            return dropout_lora_attached(pairs, self.config.dropout)
        return fused_lora_attached(pairs)

    def encode_images(self, pixels: Tensor) -> Tensor:
        """[N, 3, R, R] -> [N, D] unit vectors through the LoRA'd vision tower."""
        with self._adapted("vision"):
            return self.backbone.encode_images(pixels, grad=torch.is_grad_enabled())

    def prompt_labels(self, labels: LabelSet) -> LabelSet:
        """``labels`` with the method's template (CLIP-LoRA's one sentence per class)."""
        return replace(labels, template=self.config.template) if self.config.template else labels

    def class_embeddings(self, labels: LabelSet) -> Tensor:
        """[C, P, D] through the LoRA'd text tower; with gradients when grad is enabled."""
        texts = [t for row in self.prompt_labels(labels).prompt_texts() for t in row]
        with self._adapted("text"):
            out = self.backbone.encode_text(texts, grad=torch.is_grad_enabled())  # [C*P, D]
        return out.view(labels.n_classes, labels.n_prompts, -1)

    def training_loss(self, batch: TrainBatch) -> LossOutput:
        img = self.encode_images(batch.views.flatten(0, 1))  # [B, D] (one view per image)
        txt = self.class_embeddings(self.train_labels.bare())[:, 0]  # [C, D]
        ce = F.cross_entropy(self.logit_scale * img @ txt.T, batch.labels)
        return LossOutput(ce, {"ce": ce})


METHOD = MethodSpec(
    name="clip-lora",
    summary="CLIP-LoRA: rank-2 LoRA on q, k, v of every layer of both CLIP towers",
    config=ClipLoRAConfig,
    model=ClipLoRA,
    train_defaults=clip_lora_train_defaults,
    paper="Zanella and Ben Ayed, Low-Rank Few-Shot Adaptation of Vision-Language Models, "
    "CVPR Workshops 2024 (MaxZanella/CLIP-LoRA)",
)
