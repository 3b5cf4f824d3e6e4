"""What an adaptation is: a base scorer's class scores and image embeddings in, better
class scores out, learned from the test images themselves without labels.

Two kinds (docs/design.md 1.3):

* **online** (:class:`OnlineAdaptation`: TDA, DOTA): a stream of test images, state
  carried from one image to the next. The caller owns the state
  (:meth:`OnlineAdaptation.new_state`) and passes it to every :meth:`~OnlineAdaptation.step`,
  as Hugging Face's caller owns a ``Cache``. A step takes a batch of rows and processes
  them strictly one at a time in row order, so a batch of b images gives exactly what b
  calls of one image give: batching never changes a result, order does (it is part of
  the record).
* **transductive** (:class:`TransductiveAdaptation`: TransCLIP): the whole test set at
  once; :meth:`~TransductiveAdaptation.solve` sees every row, and its result does not
  depend on their order (to rounding).

Each adaptation has a frozen ``Config`` dataclass whose fields are declared with
:func:`awt_engine.options.option` (help text and bounds on the field, the paper's
default and its source beside it); ``--set NAME=VALUE`` reaches them through
:func:`adapt_config`. Adaptations see tensors only (no model, no CLIP).

Axes::

    b images in a batch (N: the whole set)   C classes   D embedding width
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from awt_engine.options import apply_options, option_help

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class AdaptBatch:
    """What an adaptation reads for b images (N for the whole set)."""

    scores: (
        Tensor  # [b, C] the base scorer's scores on the logit scale (softmax: its probabilities)
    )
    features: Tensor  # [b, D] L2-normalised image embedding (Scorer.image_features)
    class_features: Tensor  # [C, D] L2-normalised class embeddings (Scorer.class_features)
    scale: float = 100.0  # the model's logit scale (CLIP's logit_scale.exp())

    def __post_init__(self):
        b, C = self.scores.shape
        if self.features.dim() != 2 or self.features.shape[0] != b:
            raise ValueError(
                f"features must be [b, D] with b = {b} images, got {tuple(self.features.shape)}"
            )
        if tuple(self.class_features.shape) != (C, self.features.shape[1]):
            raise ValueError(
                f"class_features must be [C, D] = [{C}, {self.features.shape[1]}], "
                f"got {tuple(self.class_features.shape)}"
            )

    @property
    def n_images(self) -> int:
        return self.scores.shape[0]

    def rows(self, start: int, stop: int) -> AdaptBatch:
        """Images ``start:stop`` (the class features and scale shared)."""
        return AdaptBatch(
            self.scores[start:stop], self.features[start:stop], self.class_features, self.scale
        )


class Adaptation:
    """Base of both kinds: a name, a one-line summary, the paper, and a Config."""

    name: ClassVar[str]
    summary: ClassVar[str]
    paper: ClassVar[str] = ""
    online: ClassVar[bool]  # True: a stream with state; False: the whole set at once
    Config: ClassVar[type]  # frozen dataclass, fields declared with options.option

    def default_config(self):
        return self.Config()

    def options(self) -> dict[str, str]:
        """Option name -> help text (``awt-engine scorers --verbose``)."""
        return option_help(self.Config)

    def __repr__(self) -> str:
        return f"<adaptation {self.name!r}>"


class OnlineAdaptation(Adaptation):
    """A stream of test images with caller-owned state."""

    online = True

    def new_state(self, config) -> Any:
        """A fresh state (nothing seen yet)."""
        raise NotImplementedError

    def step(self, batch: AdaptBatch, state: Any, config) -> Tensor:
        """Adapted scores [b, C] (logit scale) for the batch's rows, processed one image at
        a time in row order; ``state`` is updated in place."""
        raise NotImplementedError


class TransductiveAdaptation(Adaptation):
    """The whole test set at once."""

    online = False

    def solve(self, batch: AdaptBatch, config, memory_budget: int | None = None) -> Tensor:
        """Adapted scores [N, C] (logit scale) for all N rows of ``batch``."""
        raise NotImplementedError


# Filled by @register_adaptation. The built-in ones register when the package is
# imported (awt_engine/adapt/__init__.py imports each module), which Python does before
# any of its modules, so the registry is complete whenever this module is in use.
ADAPTATIONS: dict[str, Adaptation] = {}


def register_adaptation(cls: type[Adaptation]) -> type[Adaptation]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    if cls.name in ADAPTATIONS:
        raise ValueError(f"an adaptation named {cls.name!r} is already registered")
    ADAPTATIONS[cls.name] = cls()
    return cls


def get_adaptation(name: str | Adaptation) -> Adaptation:
    """The adaptation called ``name``; ValueError listing the choices otherwise."""
    if isinstance(name, Adaptation):
        return name
    if name not in ADAPTATIONS:
        raise ValueError(f"unknown adaptation {name!r}; choose one of: {', '.join(ADAPTATIONS)}")
    return ADAPTATIONS[name]


def list_adaptations() -> list[str]:
    return list(ADAPTATIONS)


def adapt_config(name: str | Adaptation, options: dict[str, Any] | None = None):
    """The Config of adaptation ``name`` with ``options`` (``--set`` strings allowed)
    applied and checked; ValueError naming the bad option or value."""
    a = get_adaptation(name)
    if isinstance(options, a.Config):
        return options
    return apply_options(a.default_config(), options, f"adaptation {a.name!r}")


__all__ = [
    "ADAPTATIONS",
    "AdaptBatch",
    "Adaptation",
    "OnlineAdaptation",
    "TransductiveAdaptation",
    "adapt_config",
    "get_adaptation",
    "list_adaptations",
    "register_adaptation",
]
