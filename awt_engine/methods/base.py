"""What every trainable method is: a model behind the interface that can also learn.

A method supplies three things and nothing else (:mod:`awt_engine.training` does the rest:
data, the one fit loop, the schedule, checkpoints):

* a frozen ``Config`` dataclass of its hyper-parameters, each default with its source,
  each option declared once with :func:`option` (its help text, and for sizes the
  bounds checked by :func:`check_values` before anything is allocated: for ``--set``
  options, a checkpoint's header and every build);
* a :class:`TrainableModel` subclass (an Embedder; a LogitModel derives from
  :class:`TrainableBase`): its modules (the only parameters that learn), the
  interface calls (``encode_images`` / ``class_embeddings``, or ``logits`` for a
  generative model) and its loss terms (:meth:`TrainableBase.training_loss`);
* a :class:`MethodSpec` naming them, with the paper's training defaults per shot count.

The frozen backbone is held by the model but is not one of its modules: it is never
saved, its parameters never require gradients, and ``learned_state()`` holds only what
the method learns.

Axes: B images, V views, C classes, P prompts, D width, R input size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from awt_engine.inputs.views import ViewConfig
from awt_engine.labelled import LabelledData
from awt_engine.labels import LabelSet
from awt_engine.models.base import TrainedInfo, learned_identity
from awt_engine.options import (  # re-exported: methods declare their options here
    bounded as bounded,
)
from awt_engine.options import check_config as check_config
from awt_engine.options import check_values as check_values
from awt_engine.options import option as option
from awt_engine.options import option_help as option_help


@dataclass(frozen=True)
class TrainBatch:
    """One optimisation step's input."""

    views: Tensor  # [B, V, 3, R, R] augmented views
    labels: Tensor  # [B] class indices into the training label set
    epoch: int
    step: int  # within the epoch
    generator: torch.Generator  # seeded by (seed, epoch, step): the method's own draws


@dataclass(frozen=True)
class LossOutput:
    total: Tensor  # the scalar that is optimised
    terms: dict[str, Tensor]  # its named parts (as added into total, weights applied)


class TrainableBase(nn.Module):
    """Base of every method's model: identity, learned state, loss; no interface calls.

    Subclasses set ``method``, build their modules in ``__init__`` (after calling
    ``super().__init__(backbone, config)``) or in :meth:`prepare` when they depend on
    the classes, and implement :meth:`training_loss` and the interface calls. An
    Embedder method derives from :class:`TrainableModel`; a LogitModel (eP-ALM) from
    this class directly, so it has no ``embed_views`` and is never taken for an Embedder.
    """

    method: ClassVar[str] = "?"
    # Why the method cannot run on int8 towers (it changes a tower's inside); "" if it can
    int8_refusal: ClassVar[str] = ""

    def __init__(self, backbone, config):
        super().__init__()
        object.__setattr__(self, "backbone", backbone)  # frozen, deliberately not a submodule
        self.config = config
        self.logit_scale = float(backbone.logit_scale)
        self.preprocess = backbone.preprocess
        self.device = backbone.device
        self.weights = getattr(backbone, "weights", None)
        self.precision = getattr(backbone, "precision", None) or str(backbone.dtype).removeprefix(
            "torch."
        )
        self.dim = getattr(backbone, "embed_dim", None)
        self.train_labels: LabelSet | None = None
        # the checkpoint this model was loaded from (set by models.factory.load_trained)
        self.checkpoint: TrainedInfo | None = None

    def use_cache_root(self, root) -> None:
        """Where the method keeps what it derives from frozen models (LLaMP's K/V cache):
        the run's ``--cache-dir``. Nothing by default."""

    # -- identity and state ----------------------------------------------------------

    @property
    def base_identity(self) -> str:
        """The frozen models underneath: the backbone (and precision), plus any LLM."""
        extra = "".join(f"|{k}={v}" for k, v in sorted(self.frozen_parts().items()))
        return f"{self.backbone.identity}|{self.precision}{extra}"

    def frozen_parts(self) -> dict[str, str]:
        """Fingerprints of frozen models the method uses besides the backbone (its LLM);
        a checkpoint records them and refuses to load on others."""
        return {}

    @property
    def identity(self) -> str:
        """Base model, method and a hash of every learned tensor: keys every cache."""
        return learned_identity(self.base_identity, self.method, self.learned_state())

    def learned_state(self) -> dict[str, Tensor]:
        """Only what the method learns (parameters that require gradients), by name."""
        return {
            self.state_name(n): p.detach() for n, p in self.named_parameters() if p.requires_grad
        }

    def state_name(self, name: str) -> str:
        """The name a learned parameter is saved under: its module path unless a method
        gives a stabler one (CLAMP drops peft's adapter name)."""
        return name

    def load_learned(self, state: Mapping[str, Tensor]) -> None:
        """Load tensors saved by :meth:`learned_state`; every name and shape must match
        and every value be finite in the model's dtype (ValueError else, nothing loaded)."""
        own = {self.state_name(n): p for n, p in self.named_parameters()}
        expected = {n for n, p in own.items() if p.requires_grad}
        missing, extra = expected - set(state), set(state) - expected
        if missing or extra:
            raise ValueError(
                f"checkpoint tensors do not fit this {self.method} model: missing "
                f"{sorted(missing) or 'none'}, unexpected {sorted(extra) or 'none'}"
            )
        ready = {}
        for name, value in state.items():  # every tensor checked before any is copied
            p = own[name]
            if tuple(p.shape) != tuple(value.shape):
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {tuple(value.shape)}, this model "
                    f"has {tuple(p.shape)} (another class count or configuration?)"
                )
            ready[name] = value.to(p.device, p.dtype)
            if ready[name].is_floating_point() and not bool(torch.isfinite(ready[name]).all()):
                raise ValueError(
                    f"checkpoint tensor {name!r} holds values that are not finite in "
                    f"{str(p.dtype).removeprefix('torch.')} (absurd or diverged weights)"
                )
        with torch.no_grad():
            for name, value in ready.items():
                own[name].copy_(value)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; one group at ``lr`` unless a method needs more."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def header(self) -> dict[str, Any]:
        """The method's hyper-parameters, as the checkpoint records them."""
        return dataclasses.asdict(self.config)

    # -- what subclasses implement ---------------------------------------------------

    def prepare(self, labels: LabelSet, seed: int = 0) -> None:
        """Set the label set the model learns (build per-class tables, precompute frozen
        parts) and create the learned tensors, randomly initialised ones from ``seed``."""
        self.train_labels = labels

    def training_data(self, data: LabelledData) -> LabelledData:
        """What the model trains on: ``data`` (the few-shot draw), unless the method reads
        its own pairs (CLAMP's ``captions`` file)."""
        return data

    def training_view_config(self, base: ViewConfig) -> ViewConfig:
        """How many augmented views one training image gets (one by default, as CoOp)."""
        return dataclasses.replace(base, n_views=1, raw_view=False, crop_interpolation="bicubic")

    def training_loss(self, batch: TrainBatch) -> LossOutput:
        raise NotImplementedError

    def unseen_classes(self, classes: tuple[str, ...]) -> str | None:
        """None when this model can score ``classes``, else why not (for the error)."""
        return None


class TrainableModel(TrainableBase):
    """A trainable Embedder: the base plus the image half of the Embedder interface."""

    def encode_images(self, pixels: Tensor) -> Tensor:
        """[N, 3, R, R] -> [N, D] unit vectors, with gradients where the method has any."""
        return self.backbone.encode_images(pixels, grad=False)

    def embed_views(self, views: Tensor) -> Tensor:
        """[B, V, 3, R, R] -> [B, V, D] (the Embedder interface)."""
        B, V = views.shape[:2]
        return self.encode_images(views.flatten(0, 1)).view(B, V, -1)


@dataclass(frozen=True)
class MethodSpec:
    """A trainable method, as the registry lists it."""

    name: str
    summary: str  # one line for `awt-engine methods`
    config: type  # the frozen Config dataclass
    model: type  # the TrainableModel subclass
    train_defaults: Callable[[int, str | None], Any]  # (shots, dataset) -> TrainConfig
    paper: str = ""  # where the defaults come from
    needs: tuple[str, ...] = ()  # extra inputs beyond CLIP (e.g. "llm")
    needs_descriptions: bool = False  # trains on the LLM descriptions (the AWT adapter)
    # (shots, dataset) -> method config fields whose paper default depends on them (the AWT
    # adapter's down rate); None: the Config's own defaults serve every shot count
    config_defaults: Callable[[int, str | None], dict[str, Any]] | None = None
    # named option sets (option NAME -> value, method or training option), applied as
    # `--set` would be, before the user's own options (which win): "released" (the official
    # code's settings, which the defaults are), "paper" where the paper's text differs,
    # "small" a recipe for a small LM on a CPU or small GPU
    presets: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    default_preset: str | None = None  # applied when none is named (None: no preset)

    @property
    def options(self) -> dict[str, str]:
        """Config field -> help, read from the fields themselves (:func:`option`)."""
        return option_help(self.config)

    def preset_options(self, name: str | None = None) -> dict[str, Any]:
        """The options of preset ``name`` (None: the default preset; {} when the method has
        none); ValueError naming the method's presets for an unknown name."""
        name = self.default_preset if name is None else name
        if name is None:
            return {}
        if name not in self.presets:
            known = ", ".join(self.presets) or "none"
            raise ValueError(f"unknown preset {name!r} for {self.name}; its presets: {known}")
        return dict(self.presets[name])

    def default_config(self, shots: int, dataset: str | None = None):
        """The method's config with the paper's defaults for ``shots`` (and ``dataset``)."""
        fields = self.config_defaults(shots, dataset) if self.config_defaults else {}
        return self.config(**fields)

    def build(self, backbone, config=None, **overrides) -> TrainableModel:
        cfg = config if config is not None else self.config()
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        check_config(cfg)
        return self.model(backbone, cfg)
