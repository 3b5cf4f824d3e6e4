"""Scorers: view and prompt embeddings (or logits) in, class scores ``[B, C]`` out.

A scorer is one way of turning a model's outputs into class scores: AWT itself, the
zero-shot CLIP baselines and the AWT ablations. Every model behind the interface
(zero-shot CLIP, a trained method, a generative model) is scored by the same scorers.

Each scorer declares what it needs, so callers never special-case names:

* ``uses_views``: the random crops; when False only view 0 is made and encoded;
* ``uses_descriptions``: prompts past the bare one; when False only prompt 0 is encoded;
* ``needs_embeddings``: it cannot work from logits alone (``clip-descriptions`` averages
  prompt embeddings), so a :class:`~awt_engine.models.base.LogitModel` cannot use it.

Axes::

    B images   V views (view 0 = the un-augmented image)
    C classes  P prompts (prompt 0 = the bare template)   D embedding width

Logits are ``[B, V, C, P]`` everywhere in the engine (``scale * similarity``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported on first scoring, so naming scorers stays cheap
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
class Scorer:
    name: str
    summary: str
    uses_views: bool  # the random crops (False: view 0 only)
    uses_descriptions: bool  # prompts past the bare one (False: prompt 0 only)
    from_embeddings: Callable[..., Tensor]  # (img [B,V,D], txt [C,P,D], scale, config, budget)
    from_logits: Callable[..., Tensor] | None  # (logits [B,V,C,P], scale, config, budget)
    awt: tuple[str, bool] | None = None  # (weighting, transport) of AWT and its ablations

    @property
    def needs_embeddings(self) -> bool:
        """It cannot score from [B, V, C, P] logits alone."""
        return self.from_logits is None

    def views_needed(self, n_views: int) -> int:
        return n_views if self.uses_views else 1


def _clip(img: Tensor, txt: Tensor, scale: float, config, budget) -> Tensor:
    return scale * img[:, 0] @ txt[:, 0].T  # raw view vs bare prompt: [B, C]


def _clip_logits(logits: Tensor, scale: float, config, budget) -> Tensor:
    return logits[:, 0, :, 0]


def _clip_descriptions(img: Tensor, txt: Tensor, scale: float, config, budget) -> Tensor:
    import torch.nn.functional as F

    proto = F.normalize(txt.mean(dim=1), dim=-1)  # [C,D] normalised mean prompt
    return scale * img[:, 0] @ proto.T


def _awt(weighting: str, transport: bool):
    """AWT or one of its ablations, from embeddings and from logits."""
    kw = {"weighting": weighting, "transport": transport}

    def from_embeddings(img, txt, scale, config, budget):
        from awt_engine.scoring import awt_solve

        return awt_solve(img, txt, scale, config=config, memory_budget=budget, **kw).scores

    def from_logits(logits, scale, config, budget):
        from awt_engine.scoring import awt_scores_from_logits

        out = awt_scores_from_logits(logits, scale, config=config, memory_budget=budget, **kw)
        return out.scores

    return from_embeddings, from_logits


SCORERS: dict[str, Scorer] = {
    s.name: s
    for s in (
        Scorer(
            "awt",
            "entropy weights + optimal transport (AWT)",
            True,
            True,
            *_awt("entropy", True),
            ("entropy", True),
        ),
        Scorer(
            "clip",
            "raw view vs bare prompt (zero-shot CLIP)",
            False,
            False,
            _clip,
            _clip_logits,
        ),
        Scorer(
            "clip-descriptions",
            "raw view vs normalised mean prompt embedding",
            False,
            True,
            _clip_descriptions,
            None,
        ),
        Scorer(
            "awt-uniform",
            "ablation: uniform weights + transport",
            True,
            True,
            *_awt("uniform", True),
            ("uniform", True),
        ),
        Scorer(
            "awt-no-transport",
            "ablation: entropy-weighted mean, no transport",
            True,
            True,
            *_awt("entropy", False),
            ("entropy", False),
        ),
    )
}


def list_scorers() -> list[str]:
    """The scorer names, AWT first."""
    return list(SCORERS)


def get_scorer(name: str | Scorer) -> Scorer:
    """The scorer called ``name``; ValueError listing the choices otherwise."""
    if isinstance(name, Scorer):
        return name
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; choose one of: {', '.join(SCORERS)}")
    return SCORERS[name]


def needs_embeddings_message(s: Scorer) -> str:
    usable = ", ".join(n for n, x in SCORERS.items() if not x.needs_embeddings)
    return (
        f"scorer {s.name!r} needs class embeddings, and this model gives logits only; "
        f"use one of: {usable}"
    )


def check_logits(logits: Tensor, n_classes: int | None = None, n_prompts: int | None = None):
    """Raise ValueError unless ``logits`` is ``[B, V, C, P]`` with the expected C and P."""
    from torch import Tensor

    want = f"[B, V, C, P] = [images, views, {n_classes or 'C'} classes, {n_prompts or 'P'} prompts]"
    if not isinstance(logits, Tensor) or logits.dim() != 4:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be {want}; got {shape}")
    _, _, C, P = logits.shape
    if (n_classes is not None and C != n_classes) or (n_prompts is not None and P != n_prompts):
        raise ValueError(
            f"logits must be {want}; got {tuple(logits.shape)} (are the class and prompt "
            "axes swapped?)"
        )


def score(
    scorer: str | Scorer,
    *,
    scale: float,
    image_embeds: Tensor | None = None,
    class_embeds: Tensor | None = None,
    logits: Tensor | None = None,
    config: AWTConfig | None = None,
    memory_budget: int | None = None,
) -> Tensor:
    """Scores ``[B, C]`` by ``scorer`` from embeddings, or from ``[B, V, C, P]`` logits."""
    from awt_engine.scoring import check_embeddings

    s = get_scorer(scorer)
    config = config or AWTConfig()
    if logits is not None:
        if image_embeds is not None or class_embeds is not None:
            raise ValueError("give either logits or embeddings, not both")
        if s.needs_embeddings:
            raise ValueError(needs_embeddings_message(s))
        check_logits(logits)
        return s.from_logits(logits, float(scale), config, memory_budget)
    if image_embeds is None or class_embeds is None:
        raise ValueError("give image_embeds [B, V, D] and class_embeds [C, P, D], or logits")
    check_embeddings(image_embeds, class_embeds)
    return s.from_embeddings(image_embeds, class_embeds, float(scale), config, memory_budget)
