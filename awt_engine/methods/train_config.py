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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WARMUPS = ("constant", "linear", "none")


@dataclass(frozen=True)
class Schedule:
    lr: float
    epochs: int
    warmup_epochs: int = 1
    warmup: str = "constant"
    warmup_lr: float = 1e-5
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.warmup not in WARMUPS:
            raise ValueError(f"warmup must be one of {', '.join(WARMUPS)}, got {self.warmup!r}")
        if self.epochs < 1 or self.warmup_epochs < 0:
            raise ValueError(
                f"need epochs >= 1 and warmup_epochs >= 0, got {self.epochs}, {self.warmup_epochs}"
            )


def lr_at(s: Schedule, epoch: int) -> float:
    """The learning rate of (0-based) ``epoch``."""
    w = s.warmup_epochs if s.warmup != "none" else 0
    if epoch < w:
        if s.warmup == "constant" or epoch == 0:
            return s.warmup_lr
        return s.lr * epoch / w
    t = epoch - w  # cosine steps taken since the warm-up ended
    lr = 0.5 * s.lr * (1 + math.cos(math.pi * t / s.epochs))
    return max(lr, s.min_lr)


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
        Schedule(self.lr, self.epochs, self.warmup_epochs, self.warmup, self.warmup_lr)

    @property
    def schedule(self) -> Schedule:
        return Schedule(
            self.lr, self.epochs, self.warmup_epochs, self.warmup, self.warmup_lr, self.min_lr
        )
