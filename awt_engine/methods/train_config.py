"""How a method is optimised: the training settings (:class:`TrainConfig`) and the
learning-rate schedule they define.

Each method declares its papers' defaults as a :class:`TrainConfig`
(:attr:`~awt_engine.methods.base.MethodSpec.train_defaults`); the fit loop
(:mod:`awt_engine.training.loop`) runs with one. Kept here, below the methods, so that
a method never imports training (which builds and runs methods).

Schedules are a function of the epoch (so a resumed run needs no state).
:func:`lr_at` reproduces Dassl's epoch-stepped schedulers, which the CoOp, LAMM and AWT
few-shot code train with: ``warmup_epochs`` at the warm-up rate (``constant``: a fixed
``warmup_lr``; ``linear``: ``warmup_lr`` at epoch 0, then ``lr * e / warmup_epochs``),
then cosine annealing over ``epochs`` counted from the end of the warm-up
(``WARMUP_RECOUNT``), floored at ``min_lr``.

Two additions reproduce eP-ALM's timm ``CosineLRScheduler`` (``scheduler/cosine_lr.py``,
driven by ``float32/caption.py``); both default off, so the Dassl schedules are unchanged:

* ``warmup_iters`` > 0: the warm-up happens inside epoch 0, by iteration, in
  ``warmup_epochs`` linear stairs of ``warmup_iters // warmup_epochs`` iterations (timm's
  ``warmup_t`` stepped with ``step(i // 100)`` after iterations 0, 100, ..., 400: the
  stair in force at iteration i >= 1 is ``min((i - 1) // stride, warmup_epochs)``), from
  ``warmup_lr`` towards ``lr``; the last stair is the cosine's start, ``lr``. The cosine
  then counts epochs from 0 (timm's ``warmup_prefix`` with ``step(epoch + warmup_t)``):
  the rest of epoch 0 at ``lr``, epoch e at the cosine's value for e.
* ``min_lr_mode="anneal"``: the cosine runs from ``lr`` down to ``min_lr``
  (``min_lr + (lr - min_lr) (1 + cos) / 2``: timm's ``lr_min``, torch's ``eta_min``);
  ``"clamp"`` (the default) is ``max(lr (1 + cos) / 2, min_lr)``.

The fit loop sets the rate of every optimizer group at every step from :func:`lr_at`,
scaled by the group's base rate over ``lr``, except groups marked ``"scheduled": False``
(eP-ALM's weight matrices: timm's ``scheduler_groups: 0`` schedules group 0 alone), which
keep their base rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WARMUPS = ("constant", "linear", "none")
MIN_LR_MODES = ("clamp", "anneal")


@dataclass(frozen=True)
class Schedule:
    lr: float
    epochs: int
    warmup_epochs: int = 1
    warmup: str = "constant"
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    warmup_iters: int = 0  # > 0: warm up by iteration inside epoch 0 (eP-ALM's timm scheduler)
    min_lr_mode: str = "clamp"

    def __post_init__(self) -> None:
        if self.min_lr_mode not in MIN_LR_MODES:
            raise ValueError(
                f"min_lr_mode must be one of {', '.join(MIN_LR_MODES)}, got {self.min_lr_mode!r}"
            )
        if self.warmup_iters < 0:
            raise ValueError(f"warmup_iters must be >= 0, got {self.warmup_iters}")
        if self.warmup_iters and (
            self.warmup != "linear"
            or self.warmup_epochs < 1
            or self.warmup_iters % self.warmup_epochs
        ):
            raise ValueError(
                "an iteration warm-up (warmup_iters > 0) is linear, in warmup_epochs >= 1 "
                f"stairs that divide it; got warmup={self.warmup!r}, warmup_epochs="
                f"{self.warmup_epochs}, warmup_iters={self.warmup_iters}"
            )
        if self.warmup not in WARMUPS:
            raise ValueError(f"warmup must be one of {', '.join(WARMUPS)}, got {self.warmup!r}")
        if self.epochs < 1 or self.warmup_epochs < 0:
            raise ValueError(
                f"need epochs >= 1 and warmup_epochs >= 0, got {self.epochs}, {self.warmup_epochs}"
            )


def lr_at(s: Schedule, epoch: int, step: int = 0) -> float:
    """The learning rate of (0-based) ``step`` of (0-based) ``epoch``; only an iteration
    warm-up (``warmup_iters``) depends on the step."""
    if s.warmup_iters:
        return _iteration_warmup(s, epoch, step)
    w = s.warmup_epochs if s.warmup != "none" else 0
    if epoch < w:
        if s.warmup == "constant" or epoch == 0:
            return s.warmup_lr
        return s.lr * epoch / w
    return _cosine(s, epoch - w)  # cosine steps taken since the warm-up ended


def _cosine(s: Schedule, t: int) -> float:
    c = 0.5 * (1 + math.cos(math.pi * t / s.epochs))
    if s.min_lr_mode == "anneal":
        return s.min_lr + (s.lr - s.min_lr) * c
    return max(s.lr * c, s.min_lr)


def _iteration_warmup(s: Schedule, epoch: int, step: int) -> float:
    """timm's warm-up stairs inside epoch 0 (see the module docstring), then the cosine
    by epoch from 0. Iteration 0 runs at ``warmup_lr`` (the scheduler's initial value)."""
    stride = s.warmup_iters // s.warmup_epochs
    if epoch > 0 or step > s.warmup_iters:
        return _cosine(s, epoch)
    stair = 0 if step == 0 else min((step - 1) // stride, s.warmup_epochs)
    if stair >= s.warmup_epochs:
        return _cosine(s, 0)
    return s.warmup_lr + stair * (s.lr - s.warmup_lr) / s.warmup_epochs


OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; :class:`~awt_engine.methods.base.MethodSpec` gives each
    method's paper defaults (``train_defaults``), every field can be overridden."""

    epochs: int
    lr: float
    batch_size: int
    optimizer: str = "sgd"  # CoOp, LAMM, AWT: SGD (Dassl); LLaMP, CLAMP, eP-ALM: AdamW
    momentum: float = 0.9  # Dassl's SGD default
    weight_decay: float = 5e-4  # Dassl configs of CoOp, LAMM and AWT
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    warmup_epochs: int = 1  # CoOp/LAMM: 1 constant epoch; AWT: 5 linear
    warmup: str = "constant"
    warmup_lr: float = 1e-5  # Dassl WARMUP_CONS_LR / WARMUP_MIN_LR
    min_lr: float = 0.0
    # 0: warm-up by epoch (Dassl); > 0: by iteration inside epoch 0 (eP-ALM's timm scheduler)
    warmup_iters: int = 0
    # clamp: max(cosine, min_lr) (the engine's); anneal: cosine from lr to min_lr (timm, torch)
    min_lr_mode: str = "clamp"
    grad_clip: float | None = None  # CLAMP clips at 1.0
    seed: int = 1  # CoOp's seeds are 1, 2, 3
    # None: fp32 on CPU, autocast fp16 on CUDA (CoOp's fp16), bf16 over a bf16 LLM
    precision: str | None = None
    # off: CUDA's atomic-add kernels are faster and equal up to rounding; on:
    # torch.use_deterministic_algorithms (an op without such a kernel is an error)
    deterministic: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {v!r}")
        v = self.warmup_iters
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"warmup_iters must be a whole number >= 0, got {v!r}")
        for name in ("lr", "warmup_lr", "min_lr", "weight_decay", "momentum"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.grad_clip is not None and not (
            math.isfinite(self.grad_clip) and self.grad_clip > 0
        ):
            raise ValueError(f"grad_clip must be a finite number > 0 or None, got {self.grad_clip}")
        if self.precision not in (None, "fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be fp32, fp16 or bf16, got {self.precision!r}")
        if not isinstance(self.deterministic, bool):
            raise ValueError(f"deterministic must be true or false, got {self.deterministic!r}")
        self.schedule  # noqa: B018 (its checks)

    @property
    def schedule(self) -> Schedule:
        return Schedule(
            self.lr,
            self.epochs,
            self.warmup_epochs,
            self.warmup,
            self.warmup_lr,
            self.min_lr,
            self.warmup_iters,
            self.min_lr_mode,
        )
