"""Learning-rate schedules, as a function of the epoch (so a resumed run needs no state).

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
