"""CoOp: learned context vectors in front of the class name (Zhou et al., IJCV 2022).

What learns: the context, M token embeddings shared by all classes (generic) or one set
per class (``csc``). A prompt is ``[SOS] ctx_1..ctx_M name . [EOS]`` in the text tower's
token-embedding space (the name in the middle or at the front if asked), run through the
frozen CLIP text transformer (:mod:`awt_engine.models.clip_text`). Loss: cross-entropy on
``logit_scale * cos(image, class)``, one view and the bare prompt per class. Everything
of CLIP stays frozen.

With descriptions (for the AWT scorer) prompt p of a class is ``ctx name. description``;
CoOp never saw those in training, so ``--scorer awt`` on a CoOp model is the paper's
prompts plus AWT's views and descriptions, an extension.

Official (KaiyangZhou/CoOp @ ff61507c79: ``trainers/coop.py``,
``configs/trainers/CoOp/vit_b16*.yaml``, Dassl) vs here:

| setting | CoOp's code | here |
|---|---|---|
| context | 16 tokens N(0, 0.02), or a phrase's embeddings (M = its length) | same |
| CSC with a phrase | CSC ignored: one generic context (``trainers/coop.py:72-88``) | each class a copy of the phrase: ``--csc`` asks for class-specific contexts and a silently generic one would not be what the checkpoint says; without ``--csc`` it is CoOp's (equal at initialisation, they differ in what learns) |
| class position | end (middle, front) | same |
| SGD lr, momentum, wd, batch | 0.002, 0.9, 5e-4, 32 | same |
| epochs | 50 / 100 / 100 / 200 / 200 for 1 / 2 / 4 / 8 / 16 shots (ImageNet 50) | same |
| schedule | cosine, 1 constant warm-up epoch at 1e-5 | same |
| precision | fp16 | fp16 on CUDA, fp32 on CPU |
| test-time | one centre view | the engine's views (``--scorer awt``: an extension) |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from awt_engine.labels import LabelSet
from awt_engine.methods.base import (
    LossOutput,
    MethodSpec,
    TrainableModel,
    TrainBatch,
    option,
)
from awt_engine.methods.train_config import TrainConfig
from awt_engine.models.clip_text import ClipTextTower, PromptBatch
from awt_engine.registry import display_name

POSITIONS = ("end", "middle", "front")


@dataclass(frozen=True)
class CoOpConfig:
    # CoOp N_CTX (main results); set by ctx_init's length when one is given
    n_ctx: int = option(16, "context tokens (CoOp: 16)", bounds=(1, 256))
    # "": N(0, 0.02) (CoOp); a phrase, e.g. "a photo of a" (CoOp ctxv1)
    ctx_init: str = option("", 'initial context phrase, e.g. "a photo of a" ("" = random)')
    # class-specific contexts (CoOp's CSC variant)
    csc: bool = option(False, "class-specific contexts")
    # CoOp CLASS_TOKEN_POSITION: end, middle or front
    class_position: str = option("end", "end, middle or front")

    def __post_init__(self) -> None:
        if isinstance(self.n_ctx, bool) or not isinstance(self.n_ctx, int) or self.n_ctx < 1:
            raise ValueError(f"n_ctx must be a whole number >= 1, got {self.n_ctx!r}")
        if self.class_position not in POSITIONS:
            raise ValueError(
                f"class_position must be one of {', '.join(POSITIONS)}, got {self.class_position!r}"
            )


def coop_train_defaults(shots: int, dataset: str | None) -> TrainConfig:
    """CoOp's Dassl configs: epochs by shot count (ImageNet always 50)."""
    epochs = 50 if dataset == "imagenet" or shots <= 1 else 100 if shots <= 4 else 200
    return TrainConfig(epochs=epochs, lr=0.002, batch_size=32)


class PromptLearner(TrainableModel):
    """Shared machinery of CoOp and LAMM: learned token rows spliced into CLIP prompts.

    Subclasses say which pieces a class's prompt has (:meth:`pieces`) and what fills
    each slot (:meth:`fills`); prompt batches are built once per label set.
    """

    def __init__(self, backbone, config):
        super().__init__(backbone, config)
        self.text = ClipTextTower(backbone)
        self._batches: dict[str, PromptBatch] = {}
        self._keyed: tuple[LabelSet, str] | None = None  # the last label set and its key
        self._bare: tuple[LabelSet, LabelSet] | None = None  # (train_labels, its bare())

    def train_bare(self) -> LabelSet:
        """``train_labels.bare()``, what every training step scores: built once per set."""
        if self._bare is None or self._bare[0] is not self.train_labels:
            self._bare = (self.train_labels, self.train_labels.bare())
        return self._bare[1]

    def label_key(self, labels: LabelSet) -> str:
        """``labels.key()``, hashed once per label set object (LabelSet is frozen)."""
        if self._keyed is None or self._keyed[0] is not labels:
            self._keyed = (labels, labels.key())
        return self._keyed[1]

    def pieces(self, name: str) -> list:
        """The prompt of class ``name`` up to its full stop, as :meth:`ClipTextTower.batch`
        pieces (text, ``(slot, n)`` or token ids)."""
        raise NotImplementedError

    def fills(self, labels: LabelSet, batch: PromptBatch) -> dict[str, Tensor]:
        raise NotImplementedError

    def prompt_batch(self, labels: LabelSet, pieces=None) -> PromptBatch:
        """Token ids of every (class, prompt): [C * P, L], built once per label set
        (``pieces``: another way to write a class's prompt, e.g. LAMM's original one)."""
        pieces = pieces or self.pieces
        key = f"{self.label_key(labels)}|{getattr(pieces, '__name__', '')}"
        if key not in self._batches:
            prompts = []
            for c, name in enumerate(labels.classes):
                head = pieces(display_name(name))
                prompts.append([*head, "."])
                prompts += [[*head, f". {d}"] for d in labels.class_descriptions(c)]
            self._batches[key] = self.text.batch(prompts)
        return self._batches[key]

    def class_embeddings(self, labels: LabelSet) -> Tensor:
        """[C, P, D]; with gradients to the learned rows when grad is enabled."""
        why = self.unseen_classes(labels.classes)
        if why is not None:
            raise ValueError(why)
        batch = self.prompt_batch(labels)
        out = self.text.encode(batch, self.fills(labels, batch))  # [C*P, D]
        return out.view(labels.n_classes, labels.n_prompts, -1)

    def image_features(self, views: Tensor) -> Tensor:
        """Frozen image features of the training views: [B*V, D], no graph."""
        return self.backbone.encode_images(views.flatten(0, 1), grad=False)

    def logits(self, img: Tensor, txt: Tensor) -> Tensor:
        """[N, D] x [C, D] -> [N, C] scaled cosines."""
        return self.logit_scale * img @ txt.T


class CoOp(PromptLearner):
    method = "coop"

    def prepare(self, labels: LabelSet, seed: int = 0) -> None:
        super().prepare(labels, seed)
        cfg = self.config
        W = self.text.width
        if cfg.ctx_init:
            ids = self.text.encode_words(cfg.ctx_init.replace("_", " "))
            if not ids:
                raise ValueError(f"ctx_init {cfg.ctx_init!r} has no tokens")
            init = self.text.word_embeddings(ids)  # [M, W]
            if cfg.csc:
                init = init.unsqueeze(0).repeat(labels.n_classes, 1, 1)  # [C, M, W]
        else:
            g = torch.Generator().manual_seed(seed)
            shape = (labels.n_classes, cfg.n_ctx, W) if cfg.csc else (cfg.n_ctx, W)
            init = torch.randn(shape, generator=g) * 0.02  # CoOp: N(0, 0.02)
        self.n_ctx = init.shape[-2]
        self.ctx = nn.Parameter(init.to(self.device))
        self.classes = labels.classes

    def pieces(self, name: str) -> list:
        M, pos = self.n_ctx, self.config.class_position
        if pos == "end":
            return [("ctx", M), name]
        if pos == "front":
            return [name, ("ctx", M)]
        return [("ctx", M // 2), name, ("ctx", M - M // 2)]  # CoOp "middle": halves around it

    def fills(self, labels: LabelSet, batch: PromptBatch) -> dict[str, Tensor]:
        P = labels.n_prompts
        if self.config.csc:
            index = {name: i for i, name in enumerate(self.classes)}
            rows = torch.tensor([index[c] for c in labels.classes], device=self.ctx.device)
            ctx = self.ctx[rows].repeat_interleave(P, dim=0)  # [C*P, M, W]
        else:
            ctx = self.ctx.unsqueeze(0).expand(labels.n_classes * P, -1, -1)  # [C*P, M, W]
        return {"ctx": ctx.reshape(-1, ctx.shape[-1])}

    def unseen_classes(self, classes: tuple[str, ...]) -> str | None:
        if not self.config.csc:
            return None  # one context for every class: new classes are fine (CoOp's base-to-new)
        unseen = [c for c in classes if c not in set(self.classes)]
        if unseen:
            return (
                f"this CoOp model has class-specific contexts (csc) for the {len(self.classes)} "
                f"classes it was trained on ({', '.join(self.classes[:5])}...), not for "
                f"{', '.join(unseen[:5])}{' ...' if len(unseen) > 5 else ''}"
            )
        return None

    def training_loss(self, batch: TrainBatch) -> LossOutput:
        img = self.image_features(batch.views)  # [B, D] (one view per image)
        txt = self.class_embeddings(self.train_bare())[:, 0]  # [C, D]
        ce = F.cross_entropy(self.logits(img, txt), batch.labels)
        return LossOutput(ce, {"ce": ce})


METHOD = MethodSpec(
    name="coop",
    summary="CoOp: learned context vectors before the class name (frozen CLIP)",
    config=CoOpConfig,
    model=CoOp,
    train_defaults=coop_train_defaults,
    paper="Zhou et al., Learning to Prompt for Vision-Language Models, IJCV 2022",
)
