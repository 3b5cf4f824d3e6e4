"""CLAMP: a causal LLM as CLIP's text tower (Teterwak et al., "CLAMP: Contrastive LAnguage
Model Prompt-tuning"; official code piotr-teterwak/clamp, an open_clip fork).

The image tower is the frozen backbone's. The text tower is a frozen causal LM with what
learns (nothing else does):

* **LoRA** on the attention projections (q, k, v, o of every decoder layer), through
  ``peft``: A Kaiming-uniform, B zero, so at initialisation the LM is the base model;
* **N read-only prompt tokens**: a learned table of N embedding rows appended *after* the
  left-padded caption (``inputs_embeds = [caption embeddings, prompt rows]``, attention
  mask extended by ones). Causal masking keeps the caption from seeing them, so the
  caption's hidden states are those of the LM on the caption alone (and its generative
  use is untouched); the prompts read the whole caption;
* **attention pooling**: a learned query attends (multi-head) to the last hidden states of
  the N prompt positions only, then LayerNorm, then a bias-free projection to CLIP's
  embedding width;
* a learned **logit scale** (its log, initialised from the backbone's).

A caption is wrapped for the LM (``wrapper``, every ``{}`` replaced by the caption),
tokenised without padding, truncated to ``context_length`` tokens, left-padded per batch;
positions count real tokens only (``cumsum(mask) - 1``), so an embedding does not depend
on how much padding its batch needed (CLAMP pads every caption to 77 and numbers the
padded positions, which ties a caption's positions to its length).

Loss (CLAMP's ``DistillClipLoss``, summed): a symmetric InfoNCE between the frozen image
features and the caption embeddings of the batch with the learned scale (capped at 100, as
CLAMP clamps it after each step), plus ``distill_weight`` times a distillation from a
frozen CLIP teacher, the backbone's own text tower on the raw (unwrapped) captions:
soft-target cross-entropy from the teacher's softmax(100 cos) to the student's
log-softmax(100 cos), image-to-text and text-to-image, averaged.

Positives. CLAMP's pairs are one image and its caption, every other pair a negative. With
labelled images several images of a batch share a class, so here the positives of an image
are all captions of its class in the batch (soft targets spread evenly over them, in both
directions); with one caption per image (``captions``) and distinct captions this is
CLAMP's diagonal exactly (identical captions count as one class).

Training data. Labelled images: each class's captions are its label set's prompts (the
template sentence, and the sentence + each description: P of them); each step draws, per
image, one caption of its class from the step's generator. ``captions=FILE`` (CLI
``--captions``) trains on image-caption pairs instead: one JSON line per image,
``{"image": path, "caption": text}``, paths relative to the file's folder, every line used
(``--shots`` applies to the labelled images only); every distinct
caption becomes a training "class" (:meth:`CLAMP.training_data`), so the data fingerprint
covers the captions. The label set (from ``--data-root``) is still what the checkpoint
records and what the val split reports.

Inference: ``class_embeddings(labels)`` runs the tower on every class's prompts (prompt 0
the bare sentence, p >= 1 with description p), wrapped as in training: [C, P, D].

Defaults and their sources (``src/open_clip/model_configs/clamp.json``,
``src/open_clip/hf_model.py``, ``launch_scripts/rebuttal*.sh``): Vicuna-13B v1.5, N = 24,
LoRA r = 16, alpha = 16, dropout 0.1 on q/k/v/o, an 8-head pooler, AdamW lr 5e-4,
betas (0.9, 0.999), eps 1e-8, weight decay 0.5 except gains, biases and the logit scale,
grad clip 1.0, cosine schedule after a warm-up. Deviations:

* the wrapper: CLAMP's wraps a bare caption into "A photo of a ..."; ours are sentences
  already (``CLAMP_WRAPPER`` is the paper's, for bare captions); CLAMP's zero-shot runs
  unwrapped templates, here inference wraps as training does;
* the warm-up and cosine are per epoch (the fit loop's schedule), not per step;
* the teacher is the backbone's own text tower (CLAMP distils from a larger CLIP; another
  teacher would need its own views at its own resolution);
* plain causal masking: CLAMP's mask override (prompts attending to each other both ways)
  is assigned to a misspelt attribute on its LoRA path and never runs;
* the scale is capped where it is used (no gradient above the cap) rather than clamped
  in place after each step: the same forward values.

Official (piotr-teterwak/clamp @ fabb9a9c1d) vs here, in short:

| setting | CLAMP's code | here |
|---|---|---|
| LM, N, LoRA, pooler | Vicuna-13B v1.5, 24, r 16 a 16 dropout 0.1 q/k/v/o, 8 heads | same; ``--preset small``: Qwen2.5-0.5B-Instruct, batch 16 |
| scoring scale | zero-shot: a fixed 100 x cosine (``src/training/zero_shot.py:32``) | 100 (``score_scale``; none: the learned scale) |
| InfoNCE scale | learned, clamped at 100 | learned, capped at 100 |
| distillation teacher | ViT-L-14 (DataComp-XL) | the backbone's own text tower |
| AdamW lr, wd, eps, clip | 5e-4, 0.5 (not gains, biases, scale), 1e-8, 1.0 | same |
| schedule | 1220 warm-up steps, cosine per step | warm-up and cosine per epoch |
| data | LAION-400M + ImageNet-21k captions, 6 x 10M samples | the few-shot images' prompts, or ``captions=FILE`` |
| prompt mask | meant bidirectional among prompts, never applied (misspelt) | plain causal |
| zero-shot prompts | unwrapped templates | wrapped as in training |
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from awt_engine.backbone.devices import seeded_rng
from awt_engine.inputs.views import ViewConfig
from awt_engine.labelled import LabelledData, LabelledItem
from awt_engine.labels import LabelSet
from awt_engine.methods._clamp_config import (  # noqa: F401  (re-exported)
    CLAMP_WRAPPER,
    DEFAULT_WRAPPER,
    PRESETS,
    CLAMPConfig,
    clamp_train_defaults,
)
from awt_engine.methods.base import (
    LossOutput,
    MethodSpec,
    TrainableModel,
    TrainBatch,
)
from awt_engine.models.lora import inject_lora, lora_state_name, reset_lora


class PromptPooler(nn.Module):
    """A learned query attending to a few hidden states, then LayerNorm (CLAMP's
    ``EosAttentionPooler``): [n, N, d] -> [n, d]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"pool_heads {heads} does not divide the LLM width {width}")
        self.query = nn.Parameter(torch.zeros(1, 1, width))
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm = nn.LayerNorm(width)

    def reset(self, g: torch.Generator) -> None:
        """CLAMP's init: query and Linear weights truncated N(0, 0.02), biases 0 (the MHA's
        fused input projection keeps PyTorch's Xavier-uniform)."""
        with torch.no_grad():
            for p, init in (
                (self.query, lambda t: nn.init.trunc_normal_(t, std=0.02, generator=g)),
                (self.attn.in_proj_weight, lambda t: nn.init.xavier_uniform_(t, generator=g)),
                (
                    self.attn.out_proj.weight,
                    lambda t: nn.init.trunc_normal_(t, std=0.02, generator=g),
                ),
            ):
                p.copy_(init(torch.empty(p.shape)))
            self.attn.in_proj_bias.zero_()
            self.attn.out_proj.bias.zero_()
            self.norm.weight.fill_(1.0)
            self.norm.bias.zero_()

    def forward(self, states: Tensor) -> Tensor:
        q = self.query.expand(states.shape[0], -1, -1)
        return self.norm(self.attn(q, states, states, need_weights=False)[0][:, 0])


@dataclass(frozen=True)
class TokenBatch:
    """Left-padded token ids of a batch of wrapped captions."""

    ids: Tensor  # [n, T]
    mask: Tensor  # [n, T] 1 for real tokens

    @property
    def positions(self) -> Tensor:
        return (self.mask.cumsum(-1) - 1).clamp(min=0)


class CLAMP(TrainableModel):
    method = "clamp"

    def __init__(self, backbone, config: CLAMPConfig):
        super().__init__(backbone, config)
        from awt_engine.models.llm import load_causal_lm

        cfg = config
        loaded = load_causal_lm(cfg.llm, device=str(self.device), dtype=cfg.llm_dtype)
        self.llm_fingerprint = loaded.fingerprint
        self.tokenizer = loaded.tokenizer
        lm = loaded.model
        self.width = int(lm.get_input_embeddings().weight.shape[1])
        self._pad_id = next(
            (
                t
                for t in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)
                if t is not None
            ),
            0,
        )
        with torch.random.fork_rng(devices=[]):  # module constructors draw; prepare re-draws
            self.lm = self._add_lora(lm)
            dev = self.device
            self.prompts = nn.Parameter(torch.zeros(cfg.n_prompt_tokens, self.width, device=dev))
            self.pooler = PromptPooler(self.width, cfg.pool_heads).to(dev)
            # built on the CPU (the forked RNG), then moved: CUDA draws would be global
            self.proj = nn.Linear(self.width, self.dim, bias=False).to(dev)
        self.log_scale = nn.Parameter(torch.tensor(math.log(self._init_scale), device=dev))
        self._captions: tuple[str, ...] | None = None  # set by training_data (captions=FILE)
        self.eval()  # inference until the fit loop says otherwise (peft's dropouts start in train)

    # -- construction ------------------------------------------------------------------

    def _add_lora(self, lm):
        cfg = self.config
        return inject_lora(
            lm, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.targets, name=cfg.llm
        )

    def frozen_parts(self) -> dict[str, str]:
        return {"llm": self.llm_fingerprint}

    @property
    def logit_scale(self) -> float:
        """What the scorers multiply similarities by: ``score_scale`` (CLAMP's zero-shot
        100), or with ``score_scale=None`` the learned scale (capped). Training's InfoNCE
        always uses the learned one."""
        if self.config.score_scale is not None:
            return float(self.config.score_scale)
        if "log_scale" not in self._parameters:
            return self._init_scale
        return float(self._scale().detach())

    @logit_scale.setter
    def logit_scale(self, value: float) -> None:  # the base class sets the backbone's
        self._init_scale = float(value)

    def _scale(self) -> Tensor:
        return self.log_scale.exp().clamp(max=self.config.max_logit_scale)

    def state_name(self, name: str) -> str:
        """peft's ``lm.<path>.lora_A.default.weight`` -> ``lora.<path>.lora_A.weight``."""
        return lora_state_name(name, "lm")

    def prepare(self, labels: LabelSet, seed: int = 0) -> None:
        """Every learned tensor from ``seed``: LoRA A Kaiming-uniform (peft's), B zero; the
        prompt rows the vocabulary's mean embedding plus N(0, initializer_range) (CLAMP
        appends them to the vocabulary, where resizing draws them so, plus the mean); the
        pooler as CLAMP; the projection as nn.Linear; the scale the backbone's."""
        super().prepare(labels, seed)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            reset_lora(self.lm, g)
            vocab = self.lm.get_input_embeddings().weight.float()
            std = float(getattr(self.lm.config, "initializer_range", 0.02))
            noise = torch.randn(self.prompts.shape, generator=g) * std
            self.prompts.copy_(vocab.mean(0).cpu() + noise)
            self.pooler.reset(g)
            self.proj.weight.copy_(
                nn.init.kaiming_uniform_(
                    torch.empty(self.proj.weight.shape), a=math.sqrt(5), generator=g
                )
            )
            start = self.config.init_logit_scale or self._init_scale
            self.log_scale.fill_(math.log(min(start, self.config.max_logit_scale)))

    def param_groups(self, lr: float) -> list[dict]:
        """CLAMP's two AdamW groups: weight decay on matrices, none on gains, biases and
        the logit scale (open_clip's ``p.ndim < 2 or 'bias' in name or logit_scale``)."""
        decay, plain = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (plain if p.ndim < 2 or "bias" in name or name == "log_scale" else decay).append(p)
        return [{"params": decay, "lr": lr}, {"params": plain, "lr": lr, "weight_decay": 0.0}]

    def training_view_config(self, base: ViewConfig) -> ViewConfig:
        """open_clip's training transform, which CLAMP uses: one RandomResizedCrop at scale
        (0.9, 1), bicubic, no flip."""
        return dataclasses.replace(
            base,
            n_views=1,
            raw_view=False,
            scale=(0.9, 1.0),
            flip_p=0.0,
            crop_interpolation="bicubic",
        )

    # -- captions ----------------------------------------------------------------------

    def training_data(self, data: LabelledData) -> LabelledData:
        """The labelled images, or with ``captions`` the file's image-caption pairs: one
        item per line, its label the index of its caption among the distinct captions."""
        if self.config.captions is None:
            self._captions = None
            return data
        path = Path(self.config.captions).expanduser()
        captions, items = read_captions(path)
        self._captions = captions
        return LabelledData(
            path.stem,
            captions,
            items,
            f"captions {path}: {len(items)} images, {len(captions)} distinct captions",
        )

    def wrap(self, caption: str) -> str:
        return self.config.wrapper.replace("{}", caption)

    def tokens(self, texts: list[str]) -> TokenBatch:
        """Wrapped texts -> left-padded ids (each truncated to ``context_length``)."""
        seqs = [
            self.tokenizer(t, add_special_tokens=True)["input_ids"][: self.config.context_length]
            for t in texts
        ]
        if not all(seqs):
            raise ValueError("a caption has no tokens")
        T = max(map(len, seqs))
        ids = torch.full((len(seqs), T), self._pad_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, T - len(s) :] = torch.tensor(s)
            mask[i, T - len(s) :] = 1
        return TokenBatch(ids.to(self.device), mask.to(self.device))

    def hidden_states(self, tokens: TokenBatch, *, prompts: bool = True) -> Tensor:
        """The LM's last hidden states (after its final norm): [n, T (+ N), width], the
        prompt rows appended after the caption when ``prompts``."""
        embed = self.lm.get_input_embeddings()(tokens.ids)
        mask = tokens.mask
        if prompts:
            n, N = tokens.ids.shape[0], self.prompts.shape[0]
            rows = self.prompts.to(embed.dtype).unsqueeze(0).expand(n, -1, -1)
            embed = torch.cat([embed, rows], dim=1)
            mask = torch.cat([mask, mask.new_ones(n, N)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.lm.base_model(
            inputs_embeds=embed, attention_mask=mask, position_ids=positions, use_cache=False
        )
        return out.last_hidden_state

    def encode_captions(self, captions: list[str]) -> Tensor:
        """Raw captions -> [n, D] unit vectors through the LM tower (with the graph when
        grad is enabled)."""
        bs = self.config.text_batch_size
        parts = []
        for s in range(0, len(captions), bs):
            tok = self.tokens([self.wrap(c) for c in captions[s : s + bs]])
            states = self.hidden_states(tok)[:, -self.config.n_prompt_tokens :]
            parts.append(self.proj(self.pooler(states.float())))
        return F.normalize(torch.cat(parts), dim=-1)

    def class_embeddings(self, labels: LabelSet) -> Tensor:
        """[C, P, D]: every class's prompts (prompt 0 the bare sentence) through the tower."""
        texts = [t for row in labels.prompt_texts() for t in row]
        return self.encode_captions(texts).view(labels.n_classes, labels.n_prompts, -1)

    # -- training ----------------------------------------------------------------------

    def batch_captions(self, batch: TrainBatch) -> list[str]:
        """One caption per image: its own (captions file), or one of its class's P prompts
        drawn from the step's generator."""
        y = batch.labels.tolist()
        if self._captions is not None:
            return [self._captions[i] for i in y]
        texts = self.train_labels.prompt_texts()
        P = self.train_labels.n_prompts
        pick = torch.randint(P, (len(y),), generator=batch.generator).tolist()
        return [texts[c][p] for c, p in zip(y, pick, strict=True)]

    @contextmanager
    def _dropout_rng(self, generator: torch.Generator) -> Iterator[None]:
        """LoRA dropout draws from a seed of the step's generator, never the global RNG."""
        seed = int(torch.randint(2**62, (1,), generator=generator))
        # the model's own device's generator (CUDA or MPS), forked and seeded: not the
        # current CUDA device's, which torch.cuda.manual_seed alone would seed
        with seeded_rng(seed, self.device):
            yield

    def training_loss(self, batch: TrainBatch) -> LossOutput:
        cfg = self.config
        captions = self.batch_captions(batch)
        img = self.backbone.encode_images(batch.views[:, 0], grad=False)  # [B, D]
        with self._dropout_rng(batch.generator):
            txt = self.encode_captions(captions)  # [B, D]
        y = batch.labels
        pos = (y.unsqueeze(0) == y.unsqueeze(1)).float()  # [B, B] same class (or caption)
        target = pos / pos.sum(1, keepdim=True)  # symmetric: the same for both directions
        logits = self._scale() * img @ txt.T  # [B images, B captions]
        contrastive = (soft_ce(logits, target) + soft_ce(logits.T, target)) / 2
        terms = {"contrastive": contrastive}
        if cfg.distill_weight > 0:
            teacher_txt = self.teacher_text(captions)  # [B, D]
            t = cfg.distill_scale * img @ teacher_txt.T
            s = cfg.distill_scale * img @ txt.T
            distill = (soft_ce(s, t.softmax(-1)) + soft_ce(s.T, t.T.softmax(-1))) / 2
            terms["distill"] = cfg.distill_weight * distill
        return LossOutput(sum(terms.values()), terms)

    def teacher_text(self, captions: list[str]) -> Tensor:
        """The frozen teacher's [B, D] features of training captions: the fixed pool they
        are drawn from (every class's prompts, or the captions file's) encoded once per
        pool (and autocast state), then looked up every step."""
        source = self._captions if self._captions is not None else self.train_labels
        dev = self.device.type
        amp = torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev)
        cached = getattr(self, "_teacher", None)
        if cached is None or cached[0] is not source or cached[1] != amp:
            pool = source if self._captions is not None else source.prompt_texts()
            texts = list(pool) if self._captions is not None else [t for r in pool for t in r]
            feats = self.backbone.encode_text(texts, grad=False)  # [K, D]
            self._teacher = (source, amp, {t: i for i, t in enumerate(texts)}, feats)
        index, feats = self._teacher[2], self._teacher[3]
        if not all(c in index for c in captions):  # not from the pool: encode them as they are
            return self.backbone.encode_text(captions, grad=False)
        return feats[torch.tensor([index[c] for c in captions], device=feats.device)]


def soft_ce(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over rows of -sum(target * log_softmax(logits))."""
    return -(target * logits.log_softmax(-1)).sum(-1).mean()


def read_captions(path: Path) -> tuple[tuple[str, ...], tuple[LabelledItem, ...]]:
    """(distinct captions in first-seen order, items) of a captions file; ValueError naming
    the file and line of anything unusable."""
    if not path.is_file():
        raise ValueError(f"captions file {path} does not exist")
    index: dict[str, int] = {}
    items: list[LabelledItem] = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"captions file {path}, line {n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(row, Mapping):
                raise ValueError(f'{where}: expected {{"image": path, "caption": text}}')
            image, caption = row.get("image"), row.get("caption")
            if not isinstance(image, str) or not image.strip():
                raise ValueError(f'{where}: "image" must be a path, got {image!r}')
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f'{where}: "caption" must be non-empty text, got {caption!r}')
            file = Path(image).expanduser()
            file = file if file.is_absolute() else path.parent / file
            if not file.is_file():
                raise ValueError(f"{where}: image {file} does not exist")
            caption = " ".join(caption.split())
            items.append(LabelledItem(file, index.setdefault(caption, len(index))))
    if not items:
        raise ValueError(f"captions file {path} has no image-caption lines")
    return tuple(index), tuple(items)


METHOD = MethodSpec(
    name="clamp",
    summary="CLAMP: a causal LLM as CLIP's text tower (LoRA, read-only prompts, frozen image tower)",
    config=CLAMPConfig,
    model=CLAMP,
    train_defaults=clamp_train_defaults,
    paper="Teterwak et al., CLAMP: Contrastive LAnguage Model Prompt-tuning (piotr-teterwak/clamp)",
    needs=("llm",),
    presets=PRESETS,
    default_preset="released",
)
