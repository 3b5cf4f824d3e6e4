"""LAMM: learned label tokens with a hierarchical loss (Gao et al., AAAI 2024).

What learns: for every training class, the token embeddings of the first L tokens of its
name (L = the shortest class name's BPE length, usually 1), which replace those tokens in
``ctx name .``. The context is "a photo of a", frozen (pure LAMM, the paper's main
setting) or learned too (``learn_ctx``: CoOp + LAMM). The label table starts from the
names' own word embeddings (or N(0, 0.02), ``random_init``), so at initialisation LAMM is
frozen CLIP with the "a photo of a" prompt.

The hierarchical loss (LAMM's ``--triplet-loss``, as its ``trainers/coop.py`` computes it):

* CE on ``logit_scale * cos(image, class)`` with the learned labels;
* parameter space: ``param_weight * sum((labels - initial labels)^2)``;
* feature space: ``feature_weight * mean_i (1 - cos(t_y_i, t0_y_i))``, t the class text
  feature with learned labels, t0 the same with the original name tokens (detached), over
  the batch samples whose batch holds some other label;
* logit space: ``logit_weight * T^2 * KL(softmax(learned / T) || softmax(original / T))``
  with T = 2: the learned logits are the (undetached) target and the original-label logits
  the prediction, the reverse of usual distillation, as LAMM's ``helpers.distillation``
  orders them. The paper writes this term as a KL divergence, zero at initialisation;
  the released code computes the soft-target cross-entropy instead, which is the KL plus
  the target's entropy and so, with an undetached target, also sharpens the learned
  logits: ``logit_loss="ce"`` reproduces the code.

Classes not seen in training keep their word embeddings (LAMM's base-to-new protocol), so a
LAMM checkpoint scores any class list.

Official (gaojingsheng/LAMM @ d4e7d02672: ``trainers/coop.py:286-299``, ``train.py:219``,
``scripts/lamm/*``, ``configs/trainers/CoOp/vit_b16_ep50_ctxv1.yaml``) vs here:

| setting | LAMM's code | here |
|---|---|---|
| logit term | soft-target CE (the paper's text: KL) | CE (``logit_loss="ce"``); ``--preset paper``: KL |
| parameter weight | 1 / ``--shots``: 1 in ``base_train_lamm_all.sh`` (never passes it), 1/16 in the base-to-new scripts | 1; ``--preset released-base2new``: 1/16 |
| feature, logit weights, T | 1, 0.05, 2 | same |
| context | "a photo of a", frozen (``--origin-clip``) | same (``learn_ctx`` for CoOp + LAMM) |
| SGD lr, momentum, wd, batch, epochs | 0.002, 0.9, 5e-4, 32, 50 | same |
| schedule | cosine, 1 constant warm-up epoch at 1e-5 | same |
| precision | fp16 (Dassl) | fp16 on CUDA, fp32 on CPU |
| MaPLe + LAMM variant | yes | no |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from awt_engine.labels import LabelSet
from awt_engine.methods.base import LossOutput, MethodSpec, TrainBatch, option
from awt_engine.methods.coop import PromptLearner
from awt_engine.methods.train_config import TrainConfig
from awt_engine.models.clip_text import PromptBatch
from awt_engine.registry import display_name


@dataclass(frozen=True)
class LAMMConfig:
    # LAMM's ctxv1 config
    ctx_init: str = option("a photo of a", "context phrase")
    # False: pure LAMM (--origin-clip); True: CoOp + LAMM
    learn_ctx: bool = option(False, "also learn the context (CoOp + LAMM)")
    # labels from N(0, 0.02) instead of the word embeddings
    random_init: bool = option(False, "labels from N(0, 0.02)")
    # LAMM's --triplet-loss (its released scripts all use it)
    hierarchical: bool = option(True, "the hierarchical loss (parameter, feature, logit terms)")
    # 1/shots with shots = 1 in the few-shot script (see above)
    param_weight: float = option(1.0, "parameter-space term weight")
    # LAMM trainers/coop.py
    feature_weight: float = option(1.0, "feature-space term weight")
    # LAMM trainers/coop.py
    logit_weight: float = option(0.05, "logit-space term weight")
    # LAMM helpers.distillation
    temperature: float = option(2.0, "logit distillation temperature")
    # "kl": the paper's term; "ce": the code's soft-target CE
    logit_loss: str = option("ce", "ce (the released code) or kl (the paper)")

    def __post_init__(self) -> None:
        if not self.ctx_init.strip():
            raise ValueError("LAMM needs a context phrase (ctx_init), e.g. 'a photo of a'")
        for name in ("param_weight", "feature_weight", "logit_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.logit_loss not in ("kl", "ce"):
            raise ValueError(f"logit_loss must be 'kl' or 'ce', got {self.logit_loss!r}")


def lamm_train_defaults(shots: int, dataset: str | None) -> TrainConfig:
    return TrainConfig(epochs=50, lr=0.002, batch_size=32)


class LAMM(PromptLearner):
    method = "lamm"

    def prepare(self, labels: LabelSet, seed: int = 0) -> None:
        super().prepare(labels, seed)
        cfg = self.config
        ctx_ids = self.text.encode_words(cfg.ctx_init.replace("_", " "))
        self.n_ctx = len(ctx_ids)
        self.ctx = nn.Parameter(
            self.text.word_embeddings(ctx_ids).to(self.device), requires_grad=cfg.learn_ctx
        )
        self.name_ids = {c: self.text.encode_words(display_name(c)) for c in labels.classes}
        self.n_label = min(len(ids) for ids in self.name_ids.values())  # L
        if self.n_label < 1:
            raise ValueError("a class name has no tokens")
        init = torch.stack(
            [self.text.word_embeddings(self.name_ids[c][: self.n_label]) for c in labels.classes]
        )  # [C, L, W]
        if cfg.random_init:
            g = torch.Generator().manual_seed(seed)
            init = torch.randn(init.shape, generator=g) * 0.02
        self.label_tokens = nn.Parameter(init.to(self.device))
        self.register_buffer("initial_labels", init.clone().to(self.device), persistent=False)
        self.classes = labels.classes
        # a trained class's row, by the name prompts show (built once: read every step)
        self._display_rows = {display_name(c): i for i, c in enumerate(labels.classes)}
        self._original: tuple[tuple, Tensor] | None = None  # original_embeddings' cache

    def _ids(self, name: str) -> list[int]:
        return self.text.encode_words(name)

    def pieces(self, name: str) -> list:
        """Known classes: their first L tokens are learned; others keep their word tokens."""
        ids = self._ids(name)
        if self._known(name):
            return [("ctx", self.n_ctx), ("label", self.n_label), ids[self.n_label :]]
        return [("ctx", self.n_ctx), ids]

    def original(self, name: str) -> list:
        """The prompt with every class's own name tokens (LAMM's forward_test)."""
        return [("ctx", self.n_ctx), self._ids(name)]

    def _known(self, display: str) -> bool:
        return display in self._display_rows

    def fills(self, labels: LabelSet, batch: PromptBatch) -> dict[str, Tensor]:
        P = labels.n_prompts
        out = {
            "ctx": self.ctx.unsqueeze(0)
            .expand(labels.n_classes * P, -1, -1)
            .reshape(-1, self.ctx.shape[-1])
        }
        if "label" in batch.slots:
            shown = (display_name(c) for c in labels.classes)
            rows = [self._display_rows[d] for d in shown if self._known(d)]
            idx = torch.tensor(rows, device=self.label_tokens.device).repeat_interleave(P)
            out["label"] = self.label_tokens[idx].reshape(-1, self.label_tokens.shape[-1])
        return out

    def original_embeddings(self, labels: LabelSet) -> Tensor:
        """[C, P, D] with the names' own tokens (the learned labels left out). With a frozen
        context (pure LAMM) nothing in it learns: encoded once per label set (and context,
        autocast state), without a graph, and reused every step."""
        if self.ctx.requires_grad:
            return self.encode_original(labels)
        device = self.ctx.device.type
        amp = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device)
        key = (self.label_key(labels), self.ctx._version, self.ctx.data_ptr(), amp)
        cached = getattr(self, "_original", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                self._original = (key, self.encode_original(labels))
        return self._original[1]

    def encode_original(self, labels: LabelSet) -> Tensor:
        """:meth:`original_embeddings` computed afresh: [C, P, D]."""
        batch = self.prompt_batch(labels, self.original)
        fills = {"ctx": self.fills(labels, batch)["ctx"]}
        return self.text.encode(batch, fills).view(labels.n_classes, labels.n_prompts, -1)

    def training_loss(self, batch: TrainBatch) -> LossOutput:
        cfg = self.config
        labels = self.train_bare()
        img = self.image_features(batch.views)  # [B, D]
        txt = self.class_embeddings(labels)[:, 0]  # [C, D], learned labels
        logits = self.logits(img, txt)  # [B, C]
        ce = F.cross_entropy(logits, batch.labels)
        terms = {"ce": ce}
        if cfg.hierarchical:
            T = cfg.temperature
            txt0 = self.original_embeddings(labels)[:, 0]  # [C, D], original labels
            logits0 = self.logits(img, txt0)
            log_p = torch.log_softmax(logits / T, dim=-1)  # LAMM: the learned logits lead
            log_q = torch.log_softmax(logits0 / T, dim=-1)
            soft = -(log_p.exp() * log_q).sum(-1)  # the code's soft-target cross-entropy
            if cfg.logit_loss == "kl":
                soft = soft + (log_p.exp() * log_p).sum(-1)  # minus the target's entropy
            terms["logit"] = cfg.logit_weight * T**2 * soft.mean()
            y = batch.labels
            counts = (y.unsqueeze(0) != y.unsqueeze(1)).any(dim=1)  # [B] some other label
            if bool(counts.any()):
                cos = F.cosine_similarity(txt[y[counts]], txt0[y[counts]].detach(), dim=-1)
                terms["feature"] = cfg.feature_weight * (1 - cos).mean()
            else:
                terms["feature"] = ce.new_zeros(())
            moved = self.label_tokens - self.initial_labels
            terms["param"] = cfg.param_weight * moved.pow(2).sum()
        return LossOutput(sum(terms.values()), terms)


METHOD = MethodSpec(
    name="lamm",
    summary="LAMM: learned label tokens with a hierarchical loss (frozen CLIP)",
    config=LAMMConfig,
    model=LAMM,
    train_defaults=lamm_train_defaults,
    paper="Gao et al., LAMM: Label Alignment for Multi-Modal Prompt Learning, AAAI 2024",
    presets={
        # scripts/lamm/base_train_lamm_all.sh never passes --shots (train.py:219 default 1)
        "released": {"logit_loss": "ce", "param_weight": 1.0},
        # scripts/lamm/base2new_train_set*_lamm_all.sh pass --shots 16: 1 / 16
        "released-base2new": {"logit_loss": "ce", "param_weight": 1 / 16},
        "paper": {"logit_loss": "kl", "param_weight": 1.0},
    },
    default_preset="released",
)
