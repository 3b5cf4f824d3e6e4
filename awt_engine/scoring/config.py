"""What an AWT computation is asked to do (:class:`AWTConfig`) and what it returns
(:class:`AWTOutput`).

Axes::

    B images   V views (view 0 = the un-augmented image)
    C classes  P prompts (prompt 0 = the bare template)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # naming a config stays cheap: torch is imported on first scoring
    from torch import Tensor


@dataclass(frozen=True)
class AWTConfig:
    """Hyper-parameters of the AWT computation; defaults are the AWT paper's (test time).

    The AWT few-shot adapter trains with both temperatures at 1.0 (its configs).
    """

    eps: float = 0.1  # entropic regularisation (paper); keeps exp(-M/eps) in float32 range
    view_temperature: float = 0.5  # softmax temperature over -entropy of each view (paper)
    prompt_temperature: float = 0.5  # softmax temperature over -entropy of each prompt (paper)
    tol: float = 1e-2  # stop once mean |r - r_prev| over an image's classes and views < tol
    max_iter: int = 100  # hard cap on Sinkhorn iterations per image (paper's code)

    def __post_init__(self):
        for name in ("eps", "view_temperature", "prompt_temperature", "tol"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if not (isinstance(self.max_iter, int) and self.max_iter >= 1):
            raise ValueError(f"max_iter must be an integer >= 1, got {self.max_iter!r}")


@dataclass(frozen=True)
class AWTOutput:
    """Scores plus what produced them (for diagnostics and reports)."""

    scores: Tensor  # [B, C]
    view_weights: Tensor  # [B, V]
    prompt_weights: Tensor  # [B, C, P]
    iterations: Tensor  # [B] Sinkhorn iterations (0 where no transport ran)
    converged: Tensor  # [B] stopped by tolerance
    plans: Tensor | None = None  # [B, C, V, P] transport plans, when asked for (keep_plans)
