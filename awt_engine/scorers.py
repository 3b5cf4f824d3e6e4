"""Scorers: view and prompt embeddings (or logits) in, class scores ``[B, C]`` out.

A scorer is one way of turning a model's outputs into class scores: AWT itself, the
zero-shot CLIP baselines and the AWT ablations. Every model behind the interface
(zero-shot CLIP, a trained method, a generative model) is scored by the same scorers.

A scorer is a :class:`Scorer` subclass registered by name with :func:`register_scorer`
(as timm registers models): it is called with a :class:`ScoreInput` (embeddings or
logits, the scale, the images' input indices) and returns a :class:`ScoreOutput`
(scores, and with ``explain=True`` the plans and weights an explanation draws). Each
scorer declares what it needs, so callers never special-case names:

* ``uses_views``: the random crops; when False only view 0 is made and encoded;
* ``uses_descriptions``: prompts past the bare one; when False only prompt 0 is encoded;
* ``needs_embeddings``: it cannot work from logits alone (``clip-descriptions`` averages
  prompt embeddings), so a :class:`~awt_engine.models.base.LogitModel` cannot use it;
* ``stateful``: it keeps state across images (test-time adaptation, a cache). The caller
  owns the state: :meth:`Scorer.new_state` makes one, and every call gets it as
  ``state=`` (as Hugging Face passes a ``Cache`` as ``past_key_values``);
* ``order_dependent``: its result depends on the order it sees the images in, so the
  run loop keeps input order (no cached-first reordering, no splitting across workers);
* ``needs_whole_set``: it needs every image before it can score any (transduction).

Axes::

    B images   V views (view 0 = the un-augmented image)
    C classes  P prompts (prompt 0 = the bare template)   D embedding width

Logits are ``[B, V, C, P]`` everywhere in the engine (``scale * similarity``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from awt_engine.scoring.config import AWTConfig

if TYPE_CHECKING:  # torch is imported on first scoring, so naming scorers stays cheap
    from torch import Tensor


@dataclass(frozen=True)
class ScoreInput:
    """What a scorer scores: embeddings, or ``[B, V, C, P]`` logits, at a scale."""

    scale: float  # the model's logit scale (CLIP's logit_scale.exp())
    image_embeds: Tensor | None = None  # [B, V, D] L2-normalised, view 0 the raw image
    class_embeds: Tensor | None = None  # [C, P, D] L2-normalised, prompt 0 the bare one
    logits: Tensor | None = None  # [B, V, C, P] = scale * similarity
    indices: tuple[int, ...] | None = None  # [B] input positions (None: not known)

    @property
    def n_images(self) -> int:
        return (self.logits if self.logits is not None else self.image_embeds).shape[0]


@dataclass(frozen=True)
class ScoreOutput:
    """Scores, and on ``explain=True`` what produced them (None where a scorer has none)."""

    scores: Tensor  # [B, C] on the logit scale
    view_weights: Tensor | None = None  # [B, V]
    prompt_weights: Tensor | None = None  # [B, C, P]
    plans: Tensor | None = None  # [B, C, V, P] transport plans (each sums to 1)


class Scorer:
    """The scorer protocol: subclass, set the class attributes, implement ``__call__``,
    and decorate with :func:`register_scorer`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    uses_views: ClassVar[bool] = True  # the random crops (False: view 0 only)
    uses_descriptions: ClassVar[bool] = True  # prompts past the bare one
    needs_embeddings: ClassVar[bool] = False  # cannot score from [B, V, C, P] logits
    explains: ClassVar[bool] = False  # gives plans and weights on explain=True
    stateful: ClassVar[bool] = False  # keeps state across images (the caller holds it)
    order_dependent: ClassVar[bool] = False  # results depend on the order of images
    needs_whole_set: ClassVar[bool] = False  # needs every image before scoring any

    def new_state(self) -> Any:
        """A fresh state for a stateful scorer (None for a stateless one)."""
        return None

    def __call__(
        self,
        inputs: ScoreInput,
        *,
        config: AWTConfig,
        memory_budget: int | None = None,
        state: Any = None,
        explain: bool = False,
    ) -> ScoreOutput:
        raise NotImplementedError

    def views_needed(self, n_views: int) -> int:
        return n_views if self.uses_views else 1

    def image_features(self, inputs: ScoreInput, config: AWTConfig) -> Tensor:
        """[B, D] L2-normalised: the one embedding per image an adaptation reads
        (:mod:`awt_engine.adapt`). Here view 0, the un-augmented image (what zero-shot CLIP
        scores); a scorer that weighs its views overrides this with their weighted mean."""
        return _need_embeds(self, inputs)[:, 0]

    def class_features(self, inputs: ScoreInput) -> Tensor:
        """[C, D] L2-normalised: one embedding per class, what this scorer's prompts say
        about it: the normalised mean of the prompts it uses (prompt 0 alone without
        descriptions)."""
        import torch.nn.functional as F

        if inputs.class_embeds is None:
            raise ValueError(f"scorer {self.name!r}: class features need class embeddings")
        txt = inputs.class_embeds if self.uses_descriptions else inputs.class_embeds[:, :1]
        return F.normalize(txt.mean(dim=1), dim=-1)  # [C, D]

    def __repr__(self) -> str:
        return f"<scorer {self.name!r}>"


SCORERS: dict[str, Scorer] = {}


def register_scorer(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    if cls.name in SCORERS:
        raise ValueError(f"a scorer named {cls.name!r} is already registered")
    SCORERS[cls.name] = cls()
    return cls


def unregister_scorer(name: str) -> None:
    """Remove a registered scorer (tests that register their own)."""
    SCORERS.pop(name, None)


def _need_embeds(s: Scorer, inputs: ScoreInput) -> Tensor:
    if inputs.image_embeds is None or inputs.class_embeds is None:
        raise ValueError(
            f"scorer {s.name!r}: image and class embeddings are needed for features (this "
            "model gives logits only)"
        )
    return inputs.image_embeds


def _check_logits_given(inputs: ScoreInput) -> Tensor:
    if inputs.logits is None:
        raise ValueError("this scorer reads embeddings or logits; give one of them")
    return inputs.logits


@register_scorer
class AWTScorer(Scorer):
    """AWT: entropy view and prompt weights, then optimal transport (docs/design.md 2)."""

    name = "awt"
    summary = "entropy weights + optimal transport (AWT)"
    explains = True
    weighting: ClassVar[str] = "entropy"
    transport: ClassVar[bool] = True

    def __call__(self, inputs, *, config, memory_budget=None, state=None, explain=False):
        from awt_engine.scoring import awt_scores_from_logits, awt_solve

        kw = {
            "config": config,
            "weighting": self.weighting,
            "transport": self.transport,
            "memory_budget": memory_budget,
            "keep_plans": explain,
        }
        if inputs.logits is not None:
            out = awt_scores_from_logits(inputs.logits, inputs.scale, **kw)
        else:
            out = awt_solve(inputs.image_embeds, inputs.class_embeds, inputs.scale, **kw)
        if not explain:
            return ScoreOutput(out.scores)
        return ScoreOutput(out.scores, out.view_weights, out.prompt_weights, out.plans)

    def image_features(self, inputs, config):
        """[B, D]: the views' mean weighted by AWT's own view weights (entropy weights at
        ``config.view_temperature``; uniform for the uniform ablation), L2-normalised.

        The official TDA/DOTA code feeds its caches the mean embedding of the most
        confident augmented views (the 10% of lowest entropy); AWT's entropy weights are
        the soft form of that choice, over the views AWT itself scored."""
        import torch.nn.functional as F

        from awt_engine.scoring import view_weights

        img = _need_embeds(self, inputs)  # [B, V, D]
        if self.weighting == "uniform":
            u = img.new_full(img.shape[:2], 1.0 / img.shape[1])  # [B, V]
        else:
            t = config.view_temperature
            u = view_weights(img, inputs.class_embeds, inputs.scale, t)  # [B, V]
        return F.normalize((u.unsqueeze(-1) * img).sum(dim=1), dim=-1)  # [B, D]


@register_scorer
class ClipScorer(Scorer):
    name = "clip"
    summary = "raw view vs bare prompt (zero-shot CLIP)"
    uses_views = False
    uses_descriptions = False

    def __call__(self, inputs, *, config, memory_budget=None, state=None, explain=False):
        if inputs.image_embeds is not None:
            img, txt = inputs.image_embeds, inputs.class_embeds
            return ScoreOutput(inputs.scale * img[:, 0] @ txt[:, 0].T)  # [B, C]
        return ScoreOutput(_check_logits_given(inputs)[:, 0, :, 0])


@register_scorer
class ClipDescriptionsScorer(Scorer):
    name = "clip-descriptions"
    summary = "raw view vs normalised mean prompt embedding"
    uses_views = False
    needs_embeddings = True

    def __call__(self, inputs, *, config, memory_budget=None, state=None, explain=False):
        import torch.nn.functional as F

        img, txt = inputs.image_embeds, inputs.class_embeds
        proto = F.normalize(txt.mean(dim=1), dim=-1)  # [C,D] normalised mean prompt
        return ScoreOutput(inputs.scale * img[:, 0] @ proto.T)


@register_scorer
class AWTUniformScorer(AWTScorer):
    name = "awt-uniform"
    summary = "ablation: uniform weights + transport"
    weighting = "uniform"


@register_scorer
class AWTNoTransportScorer(AWTScorer):
    name = "awt-no-transport"
    summary = "ablation: entropy-weighted mean, no transport"
    transport = False


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
    reason = getattr(s, "needs_embeddings_reason", None)
    if reason:
        return f"scorer {s.name!r}: {reason}"
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
    state: Any = None,
    indices: tuple[int, ...] | None = None,
    explain: bool = False,
) -> Tensor | ScoreOutput:
    """Scores ``[B, C]`` by ``scorer`` from embeddings, or from ``[B, V, C, P]`` logits
    (the whole :class:`ScoreOutput` with ``explain=True``). A stateful scorer updates
    ``state`` (default: a fresh one, kept by nobody)."""
    from awt_engine.scoring import check_embeddings

    s = get_scorer(scorer)
    config = config or AWTConfig()
    if logits is not None:
        if image_embeds is not None or class_embeds is not None:
            raise ValueError("give either logits or embeddings, not both")
        if s.needs_embeddings:
            raise ValueError(needs_embeddings_message(s))
        check_logits(logits)
        inputs = ScoreInput(float(scale), logits=logits, indices=indices)
    else:
        if image_embeds is None or class_embeds is None:
            raise ValueError("give image_embeds [B, V, D] and class_embeds [C, P, D], or logits")
        check_embeddings(image_embeds, class_embeds)
        inputs = ScoreInput(float(scale), image_embeds, class_embeds, indices=indices)
    if s.stateful and state is None:
        state = s.new_state()
    out = s(inputs, config=config, memory_budget=memory_budget, state=state, explain=explain)
    return out if explain else out.scores


__all__ = [
    "SCORERS",
    "AWTConfig",
    "ScoreInput",
    "ScoreOutput",
    "Scorer",
    "check_logits",
    "get_scorer",
    "list_scorers",
    "needs_embeddings_message",
    "register_scorer",
    "score",
    "unregister_scorer",
]
