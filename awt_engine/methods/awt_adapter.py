"""AWT's multimodal adapter: bottleneck adapters in both CLIP towers, trained through AWT.

The few-shot part of the AWT paper (Zhu et al., NeurIPS 2024; MCG-NJU/AWT,
``AWT_few_shot/MM_Adapter``: ``trainers/awt.py``, ``trainers/ot_tools.py``,
``configs/trainers/AWT/*.yaml``).

What learns: one :class:`~awt_engine.models.layers.BottleneckAdapter` on the attention
and one on the MLP branch of every residual block of the image tower and of the text
tower (:class:`~awt_engine.models.layers.BranchAdapters`, sized from each tower's real
depth and width): ``branch + s * up(gelu(down(branch)))`` with hidden width
``width // down_rate`` (at least 1), Xavier ``down``, zero ``up`` and zero biases, and a
learnable ``s`` starting at 1. At initialisation the model is therefore exactly frozen
CLIP. Everything of CLIP stays frozen; the adapters are class-agnostic, so any classes
can be scored. They sit on the backbone as forward hooks but act only inside this model's
own encode calls, so a backbone shared with a ``ClipEmbedder`` still gives frozen CLIP.

A training step (``CustomCLIP.forward`` and ``AWT.forward_backward`` of the official code):

* images: ``train_views`` (8) augmented views each (view 0 is a crop too);
* text: every class's bare prompt plus ``prompts_per_step - 1`` (7) of its descriptions,
  one random subset per step shared by all classes, drawn from the step's generator;
* logits ``logit_scale * cos`` as ``[B, V, C, P]``, scored by AWT at the training
  temperatures (1.0 for views and prompts): the entropy weights and the transport plan
  are computed without gradient and the score ``sum T * logits`` carries the gradient
  through the logits only (:func:`awt_engine.scoring.awt_solve`, docs/design.md 2.7);
* loss: ``CE(AWT scores, labels) + 10 * L1(image features, frozen) + 25 * L1(text
  features, frozen)``, the L1 terms (means) between the adapted and the frozen towers'
  normalised features (the frozen ones with the adapters switched off, without a graph).

At inference the adapted towers are an ordinary Embedder: ``class_embeddings`` encodes
every prompt of the label set and ``embed_views`` the views, and the ``awt`` scorer
(51 views, temperatures 0.5) is the classifier's normal path; its crops are bicubic
(:meth:`AWTAdapter.eval_view_config`, which the classifier applies).

Official (MCG-NJU/AWT @ b2b49a8fd9, ``AWT_few_shot/MM_Adapter``) vs here:

| setting | AWT's code | here |
|---|---|---|
| adapters | attention and MLP branch, every layer, both towers, up zero | same, sized from the real depth (the code: 12 layers) |
| down rate | 384 (1-4 shots), 256 (8-16) | same, from ``--shots`` |
| training views, prompts | 8 crops (view 0 too), bare + 7 descriptions | same |
| loss | CE(AWT) + 10 L1 image + 25 L1 text | same |
| SGD lr, epochs | 0.002 / 20 (1-4 shots), 0.008 / 25 (8-16) | same |
| schedule | cosine after 5 linear warm-up epochs from 1e-5 | same |
| batch, precision | 16 x 8 views, fp16 | same; fp32 on CPU |
| Sinkhorn stop | error averaged over the batch | per image (its scores never depend on the batch) |
| test views | view 0 + 50 bicubic random resized crops (``vit_b16_*.yaml`` INTERPOLATION, ``data_manager.py``) | same (``eval_view_config``) |
| test temperatures | 0.5 | same (the awt scorer's) |

Axes: B images, V views, C classes, P prompts, D embedding width.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from awt_engine.inputs.views import ViewConfig
from awt_engine.labels import LabelSet
from awt_engine.methods.base import (
    LossOutput,
    MethodSpec,
    TrainableModel,
    TrainBatch,
    option,
)
from awt_engine.methods.train_config import TrainConfig
from awt_engine.models.layers import BranchAdapters
from awt_engine.scoring.config import AWTConfig


@dataclass(frozen=True)
class AWTAdapterConfig:
    # Adapter.Down_Rate: 384 in vit_b16_1_2_4_shot.yaml; train() uses 256 from 8 shots on
    # (vit_b16_8_16_shot.yaml), see awt_config_defaults
    down_rate: int = option(
        384,
        "adapter hidden width = tower width // down_rate (AWT: 384 for 1-4 shots, 256 for 8-16; set from --shots)",
        bounds=(1, 1 << 16),
    )
    # Adapter.Scale: -1.0, a learnable scale starting at 1
    learn_scale: bool = option(True, "learn each adapter's output scale (AWT: true, starting at 1)")
    # DATALOADER.K_TRANSFORMS: augmented views per training image
    train_views: int = option(8, "augmented views per training image (AWT: 8)", bounds=(1, 256))
    # LLM.Desc_Per_Batch: the bare prompt plus 7 sampled descriptions per step (the
    # authors' config comment: 4 for ImageNet, to fit memory)
    prompts_per_step: int = option(
        8, "bare prompt + sampled descriptions per step (AWT: 8; 4 for ImageNet)", bounds=(1, 1024)
    )
    # ot_tools.Wasserstein_Distance(is_train=True)
    train_view_temperature: float = option(
        1.0, "AWT view-weight temperature in training (AWT: 1.0)"
    )
    # the same
    train_prompt_temperature: float = option(
        1.0, "AWT prompt-weight temperature in training (AWT: 1.0)"
    )
    # forward_backward: L1(image features) * 10
    l1_image_weight: float = option(10.0, "weight of L1(image features, frozen CLIP) (AWT: 10)")
    # forward_backward: L1(text features) * 25
    l1_text_weight: float = option(25.0, "weight of L1(text features, frozen CLIP) (AWT: 25)")

    def __post_init__(self) -> None:
        for name in ("down_rate", "train_views", "prompts_per_step"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {v!r}")
        for name in ("train_view_temperature", "train_prompt_temperature"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        for name in ("l1_image_weight", "l1_text_weight"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


def awt_config_defaults(shots: int, dataset: str | None) -> dict:
    """The official configs' down rate by shot count: 384 for 1-4 shots, 256 beyond."""
    return {"down_rate": 384 if shots <= 4 else 256}


def awt_train_defaults(shots: int, dataset: str | None) -> TrainConfig:
    """vit_b16_1_2_4_shot.yaml / vit_b16_8_16_shot.yaml (Dassl SGD, momentum 0.9)."""
    few = shots <= 4
    return TrainConfig(
        epochs=20 if few else 25,
        lr=0.002 if few else 0.008,
        batch_size=16,
        weight_decay=5e-4,
        warmup_epochs=5,
        warmup="linear",
        warmup_lr=1e-5,
    )


class AWTAdapter(TrainableModel):
    method = "awt-adapter"
    int8_refusal = "its adapters sit on every block's attention and MLP branches inside both towers"

    def __init__(self, backbone, config: AWTAdapterConfig):
        super().__init__(backbone, config)
        self.visual_adapters: BranchAdapters | None = None
        self.text_adapters: BranchAdapters | None = None
        self._prompts: list[list[str]] = []  # every training prompt, [C][1 + n_descriptions]
        self._frozen_text: Tensor | None = None  # their frozen features [C, 1 + n, D]

    # -- building ----------------------------------------------------------------------

    def prepare(self, labels: LabelSet, seed: int = 0) -> None:
        cfg = self.config
        if cfg.prompts_per_step > 1 and labels.n_descriptions == 0:
            named = f" {labels.name!r}" if labels.name else ""
            raise ValueError(
                f"{self.method} trains on class descriptions (the bare prompt plus "
                f"{cfg.prompts_per_step - 1} descriptions per step), but the label set"
                f"{named} has none: generate them with `awt-engine describe "
                "--dataset NAME` and train with --dataset NAME (and --descriptions N > 0), "
                "or set prompts_per_step=1 to train on the bare prompts alone (not the paper's "
                "setting)"
            )
        super().prepare(labels, seed)
        for old in (self.visual_adapters, self.text_adapters):
            if old is not None:
                old.remove()  # a second prepare must not leave the first hooks behind
        bb = self.backbone
        g = torch.Generator().manual_seed(seed)
        kw = {"learn_scale": cfg.learn_scale, "generator": g}
        self.visual_adapters = BranchAdapters(bb.vision_blocks, cfg.down_rate, **kw).to(self.device)
        self.text_adapters = BranchAdapters(bb.text_blocks, cfg.down_rate, **kw).to(self.device)
        # The backbone may be shared (a ClipEmbedder on it, the frozen features below):
        # the adapters act only inside this model's own encode calls.
        self.visual_adapters.enabled = False
        self.text_adapters.enabled = False
        self._prompts = labels.prompt_texts()
        self._frozen_text = None

    def training_view_config(self, base: ViewConfig) -> ViewConfig:
        """K_TRANSFORMS augmented views per image, every one a (bicubic) random crop."""
        return dataclasses.replace(
            base, n_views=self.config.train_views, raw_view=False, crop_interpolation="bicubic"
        )

    def eval_view_config(self, base: ViewConfig) -> ViewConfig:
        """Test-time views as AWT's few-shot code makes them: its crops are the training
        transform's, bicubic (``configs/trainers/AWT/vit_b16_*.yaml`` INTERPOLATION), not
        the zero-shot views' bilinear. The classifier applies it to every view config."""
        return dataclasses.replace(base, crop_interpolation="bicubic")

    # -- the interface -----------------------------------------------------------------

    def _require_prepared(self) -> None:
        if self.visual_adapters is None or self.text_adapters is None:
            raise RuntimeError(f"{self.method}: call prepare(labels) before using the model")

    def encode_images(self, pixels: Tensor) -> Tensor:
        """[N, 3, R, R] -> [N, D] through the adapted image tower (a graph when grad is on)."""
        self._require_prepared()
        with self.visual_adapters.active():
            return self.backbone.encode_images(pixels, grad=torch.is_grad_enabled())

    def encode_texts(self, texts: list[str]) -> Tensor:
        """Prompts -> [N, D] through the adapted text tower."""
        self._require_prepared()
        with self.text_adapters.active():
            return self.backbone.encode_text(texts, grad=torch.is_grad_enabled())

    def class_embeddings(self, labels: LabelSet) -> Tensor:
        """[C, P, D]: every prompt of ``labels`` (bare, then with each description)."""
        flat = [t for row in labels.prompt_texts() for t in row]
        return self.encode_texts(flat).view(labels.n_classes, labels.n_prompts, -1)

    # -- training ----------------------------------------------------------------------

    def frozen_image_features(self, pixels: Tensor) -> Tensor:
        """[N, D] from the frozen image tower (adapters off), without a graph."""
        self._require_prepared()
        with self.visual_adapters.disabled(), torch.no_grad():
            return self.backbone.encode_images(pixels)

    def frozen_text_features(self) -> Tensor:
        """[C, 1 + n_descriptions, D]: every training prompt through the frozen text tower,
        without a graph; computed on first use and kept (the tower never changes)."""
        self._require_prepared()
        if self._frozen_text is None:
            flat = [t for row in self._prompts for t in row]
            with self.text_adapters.disabled(), torch.no_grad():
                out = self.backbone.encode_text(flat)
            self._frozen_text = out.view(len(self._prompts), len(self._prompts[0]), -1)
        return self._frozen_text

    def step_prompts(self, generator: torch.Generator) -> list[int]:
        """The prompts of one step: 0 (bare) and ``prompts_per_step - 1`` descriptions
        drawn without replacement from ``generator``, the same ones for every class
        (all of them when a class has fewer). Indices into a class's prompts."""
        n = len(self._prompts[0]) - 1  # descriptions per class
        k = min(self.config.prompts_per_step - 1, n)
        drawn = torch.randperm(n, generator=generator)[:k].tolist()
        return [0, *(1 + i for i in sorted(drawn))]

    def awt_training_config(self) -> AWTConfig:
        return AWTConfig(
            view_temperature=self.config.train_view_temperature,
            prompt_temperature=self.config.train_prompt_temperature,
        )

    def training_loss(self, batch: TrainBatch) -> LossOutput:
        from awt_engine.scoring import awt_solve

        cfg = self.config
        B, V = batch.views.shape[:2]
        pixels = batch.views.flatten(0, 1)  # [B*V, 3, R, R]
        img = self.encode_images(pixels)  # [B*V, D], with a graph
        img_frozen = self.frozen_image_features(pixels)

        chosen = self.step_prompts(batch.generator)
        C, P = len(self._prompts), len(chosen)
        txt = self.encode_texts([row[p] for row in self._prompts for p in chosen])  # [C*P, D]
        index = torch.tensor(chosen, device=self.device)
        txt_frozen = self.frozen_text_features().index_select(1, index).flatten(0, 1)

        # Weights and plan without gradient, the gradient through the logits; the scorer
        # runs in float32 also under the loop's fp16 autocast (the official code scores
        # logits.float()).
        out = awt_solve(
            img.view(B, V, -1),
            txt.view(C, P, -1),
            self.logit_scale,
            config=self.awt_training_config(),
        )
        ce = F.cross_entropy(out.scores, batch.labels)
        l1_img = cfg.l1_image_weight * F.l1_loss(img, img_frozen)
        l1_txt = cfg.l1_text_weight * F.l1_loss(txt, txt_frozen)
        return LossOutput(ce + l1_img + l1_txt, {"ce": ce, "l1_image": l1_img, "l1_text": l1_txt})


METHOD = MethodSpec(
    name="awt-adapter",
    summary="AWT's multimodal adapter: bottleneck adapters in both CLIP towers, trained "
    "through AWT",
    config=AWTAdapterConfig,
    model=AWTAdapter,
    train_defaults=awt_train_defaults,
    config_defaults=awt_config_defaults,
    paper="Zhu et al., AWT: Transferring Vision-Language Models via Augmentation, Weighting, "
    "and Transportation, NeurIPS 2024 (MCG-NJU/AWT, AWT_few_shot/MM_Adapter)",
    needs_descriptions=True,
)
