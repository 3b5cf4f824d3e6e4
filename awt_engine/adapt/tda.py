"""TDA: a training-free dynamic adapter with a positive and a negative cache of test
features (Karmanov et al., "Efficient Test-Time Adaptation of Vision-Language Models",
CVPR 2024; official code: github.com/kdiAAA/TDA, ``tda_runner.py`` and ``utils.py``).

For each image, in stream order (the official ``run_test_tda``):

1. ``p = softmax(s)``, ``H = -sum p log p`` (natural log), pseudo-label ``y = argmax s``.
2. Positive cache: offer ``(f, H)`` to class ``y`` (every image, no gate).
3. Negative cache: offer ``(f, H, p)`` to class ``y`` only when
   ``lower < H / log2(C) < upper``. **Quirk reproduced**: the official ``get_entropy``
   divides the natural-log entropy by ``log2(C)``, not ``ln(C)``, so the gate sees
   ``ln 2`` (~0.69) times the normalised entropy.
4. The offer (official ``update_cache``): a class with fewer than ``shots`` entries
   appends it; a full class replaces its worst (highest-entropy) entry when the new
   entropy is strictly lower; the class is then kept sorted by entropy (a stable sort,
   so a new entry goes after equal ones).
5. Scores: ``s + A_pos(f) - A_neg(f)`` with
   ``A(f) = alpha * sum_items exp(-(beta - beta f.k)) * v``: ``v`` the one-hot of the
   item's class (positive) or the mask ``lower < p_item < upper`` of its stored
   probabilities (negative). **Quirk reproduced**: the caches are updated *before* the
   image is scored, so an image always sees itself in the positive cache (a fresh state
   gives ``s + alpha_pos * onehot(y)`` for the first image, not ``s``).

Official vs here:

=============================  ==============================  ==============================
aspect                         official                        here
=============================  ==============================  ==============================
cache storage                  dict class -> sorted list of    tensors: keys [C, S, D] in the
                               [feature, entropy(, probs)]     features' dtype, entropies
                                                               [C, S] (+inf = empty slot,
                                                               kept sorted), counts [C],
                                                               probs [C, S, C] and their
                                                               0/1 mask [C, S, C] (negative;
                                                               remade if the thresholds
                                                               change)
cache logits                   lists concatenated per image,   one matmul over all C*S slots,
                               fp16 one-hot / mask values      empty slots masked; float32
                               (``.cuda().half()``)            (float64 for float64 inputs)
model precision                CLIP fp16 features/logits       the caller's dtype; computed in
                                                               float32 (float64 if given)
inputs                         ``clip_logits = 100 f.W``       ``batch.scores`` (any scorer's
                               from CLIP, ``f`` L2-normalised  logit-scale scores, AWT's
                                                               included), ``batch.features``
test-time augmentation         ImageNet sets: 63 AugMix views  none: one row is one image; the
                               + the image, the 10% lowest-    caller's scores and features are
                               entropy views averaged (f not   used as given
                               re-normalised), avg_entropy
batch                          one image per loader step       a batch of b rows processed
                                                               strictly one at a time in order
state                          local to ``run_test_tda``       caller-owned :class:`TDAState`
pseudo-label                   ``topk(1)`` of the logits       ``argmax`` (the two may break an
                                                               exact tie differently)
=============================  ==============================  ==============================

Axes::

    b images in a batch   C classes   D embedding width   S shots (cache capacity per class)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from awt_engine.adapt.base import AdaptBatch, OnlineAdaptation, register_adaptation
from awt_engine.options import option


@dataclass(frozen=True)
class TDAConfig:
    """TDA's hyper-parameters: the official ``configs/imagenet.yaml`` (ViT-B/16)."""

    pos_enabled: bool = option(True, "use the positive cache")  # every official config
    # positive.shot_capacity: 3 in every official config (imagenet*.yaml and the 10 others)
    pos_shot_capacity: int = option(3, "positive cache entries per class", bounds=(1, 256))
    # positive.alpha: imagenet.yaml 2.0; others 1.0 (food101, flowers, cars, imagenet_r/v),
    # 2.363 (imagenet_s), 3.0 (ucf101), 4.0 (eurosat), 5.0 (caltech101)
    pos_alpha: float = option(2.0, "weight of the positive cache logits", bounds=(0.0, 1e3))
    # positive.beta: imagenet.yaml 5.0; others 1.0-8.0 (e.g. dtd/sun397 3.0, eurosat 8.0)
    pos_beta: float = option(5.0, "sharpness of the positive affinity", bounds=(0.0, 1e3))
    neg_enabled: bool = option(True, "use the negative cache")  # every official config
    # negative.*: the same in every official config
    neg_shot_capacity: int = option(2, "negative cache entries per class", bounds=(1, 256))
    neg_alpha: float = option(0.117, "weight of the negative cache logits", bounds=(0.0, 1e3))
    neg_beta: float = option(1.0, "sharpness of the negative affinity", bounds=(0.0, 1e3))
    neg_entropy_lower: float = option(
        0.2, "negative gate: H/log2(C) must exceed this (H in nats)", bounds=(0.0, 10.0)
    )
    neg_entropy_upper: float = option(
        0.5, "negative gate: H/log2(C) must be below this (H in nats)", bounds=(0.0, 10.0)
    )
    neg_mask_lower: float = option(
        0.03, "negative mask: a stored probability must exceed this", bounds=(0.0, 1.0)
    )
    neg_mask_upper: float = option(
        1.0, "negative mask: a stored probability must be below this", bounds=(0.0, 1.0)
    )


@dataclass
class Cache:
    """One cache (positive or negative) as tensors; a class's slots sorted by entropy."""

    keys: torch.Tensor  # [C, S, D] the features' dtype
    entropy: torch.Tensor  # [C, S] compute dtype; +inf marks an empty slot
    count: torch.Tensor  # [C] long, filled slots per class
    probs: torch.Tensor | None = None  # [C, S, C] stored probabilities (negative cache)
    values: torch.Tensor | None = None  # [C, S, C] 0/1 mask of ``probs`` within ``bounds``
    bounds: tuple[float, float] = (0.0, 1.0)  # the mask thresholds ``values`` was made with

    def set_bounds(self, bounds: tuple[float, float]) -> None:
        """Remake the negative values when the mask thresholds change (never in a run of
        fixed settings, as in the official code, where they are fixed)."""
        if self.probs is not None and (self.values is None or bounds != self.bounds):
            self.bounds = bounds
            self.values = self._mask(self.probs)

    def _mask(self, probs: torch.Tensor) -> torch.Tensor:
        low, high = self.bounds
        return ((probs > low) & (probs < high)).to(probs.dtype)

    @classmethod
    def empty(cls, C, S, D, key_dtype, dtype, device, with_probs):
        return cls(
            torch.zeros(C, S, D, dtype=key_dtype, device=device),
            torch.full((C, S), math.inf, dtype=dtype, device=device),
            torch.zeros(C, dtype=torch.long, device=device),
            torch.zeros(C, S, C, dtype=dtype, device=device) if with_probs else None,
        )

    def offer(self, y, key, ent, prob=None, allowed=None) -> None:
        """The official ``update_cache`` for one item of class ``y`` (a 0-dim tensor),
        without a host sync: append while the class has room, else replace the worst
        entry if ``ent`` is strictly lower; keep the class sorted (stable: after equals)."""
        S = self.entropy.shape[1]
        slots = torch.arange(S, device=self.entropy.device)
        old = self.entropy[y]  # [S]
        accept = (self.count[y] < S) | (ent < old[S - 1])
        if allowed is not None:
            accept = accept & allowed
        # drop slot S-1 (empty when not full, the worst when full), insert at the stable
        # position: after every kept entry with entropy <= ent
        at = (old[: S - 1] <= ent).sum()
        src = slots - (slots > at).long()  # [S] where each new slot comes from
        new = slots == at  # [S]
        self.entropy[y] = torch.where(accept & new, ent, torch.where(accept, old[src], old))
        keys = self.keys[y]  # [S, D]
        moved = torch.where((accept & new)[:, None], key, keys[src])
        self.keys[y] = torch.where(accept, moved, keys)
        if self.probs is not None:
            probs = self.probs[y]  # [S, C]
            moved = torch.where((accept & new)[:, None], prob, probs[src])
            self.probs[y] = torch.where(accept, moved, probs)
            self.values[y] = self._mask(self.probs[y])
        self.count[y] = torch.where(accept, torch.clamp(self.count[y] + 1, max=S), self.count[y])

    def weights(self, f, beta: float) -> torch.Tensor:
        """[C, S] affinity weights ``exp(-(beta - beta f.k))`` of the filled slots, 0 elsewhere."""
        C, S, D = self.keys.shape
        affinity = (self.keys.reshape(C * S, D).to(f.dtype) @ f).reshape(C, S)
        filled = torch.arange(S, device=f.device)[None, :] < self.count[:, None]  # [C, S]
        return torch.exp(-(beta - beta * affinity)) * filled


@dataclass
class TDAState:
    """Caller-owned TDA memory; the caches are made at the first step (C, D known then)."""

    pos: Cache | None = None
    neg: Cache | None = None
    seen: int = 0  # images stepped


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@register_adaptation
class TDA(OnlineAdaptation):
    """Positive and negative caches of confident test features (official TDA)."""

    name = "tda"
    summary = "TDA: positive/negative caches of test features keyed by pseudo-label"
    paper = "Karmanov et al., Efficient Test-Time Adaptation of Vision-Language Models, CVPR 2024"
    Config = TDAConfig

    def new_state(self, config) -> TDAState:
        return TDAState()

    def _ensure(self, state: TDAState, config: TDAConfig, batch: AdaptBatch, dtype) -> None:
        C, D = batch.class_features.shape
        if state.pos is None:
            kd, dev = batch.features.dtype, batch.features.device
            state.pos = Cache.empty(C, config.pos_shot_capacity, D, kd, dtype, dev, False)
            state.neg = Cache.empty(C, config.neg_shot_capacity, D, kd, dtype, dev, True)
            return
        have = (state.pos.keys.shape[0], state.pos.keys.shape[2])
        if have != (C, D):
            raise ValueError(f"this TDA state holds C, D = {have}; the batch has {(C, D)}")

    def step(self, batch: AdaptBatch, state: TDAState, config: TDAConfig) -> torch.Tensor:
        """Adapted scores [b, C]; ``state`` updated in place, row after row."""
        b, C = batch.scores.shape
        dtype = _compute_dtype(batch.scores)
        self._ensure(state, config, batch, dtype)
        scores = batch.scores.to(dtype)  # [b, C]
        feats = batch.features.to(dtype)  # [b, D]
        probs = scores.softmax(1)  # [b, C]
        entropy = -(probs * scores.log_softmax(1)).sum(1)  # [b] nats (official softmax_entropy)
        labels = scores.argmax(1)  # [b]
        gate_value = entropy / math.log2(C) if C > 1 else torch.full_like(entropy, math.nan)
        gate = (config.neg_entropy_lower < gate_value) & (gate_value < config.neg_entropy_upper)
        state.neg.set_bounds((config.neg_mask_lower, config.neg_mask_upper))
        out = scores.clone()
        for i in range(b):
            y, key = labels[i], batch.features[i]
            if config.pos_enabled:
                state.pos.offer(y, key, entropy[i])
            if config.neg_enabled:
                state.neg.offer(y, key, entropy[i], probs[i], allowed=gate[i])
            if config.pos_enabled:
                w = state.pos.weights(feats[i], config.pos_beta)  # [C, S]
                out[i] += config.pos_alpha * w.sum(1)
            if config.neg_enabled:
                w = state.neg.weights(feats[i], config.neg_beta)  # [C, S]
                values = state.neg.values.reshape(-1, C)  # [C*S, C]
                out[i] -= config.neg_alpha * (w.reshape(1, -1) @ values)[0]
        state.seen += b
        return out.to(batch.scores.dtype) if batch.scores.is_floating_point() else out


__all__ = ["TDA", "Cache", "TDAConfig", "TDAState"]
