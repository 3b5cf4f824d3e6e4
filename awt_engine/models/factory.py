"""The model factory: a name or a checkpoint in, a model behind the interface out.

:func:`load_model` is the one way a model is made from what a user names (open_clip's
``create_model`` is the shape): zero-shot CLIP from (``model``, ``pretrained``), or a
trained method from a checkpoint (:func:`load_trained`, on the backbone it names). It
returns an :class:`~awt_engine.models.base.Embedder` or a
:class:`~awt_engine.models.base.LogitModel`; a model loaded from a checkpoint carries it
in its typed ``checkpoint`` field (:class:`~awt_engine.models.base.TrainedInfo`).

It sits below everything that uses a model (the classifier, evaluation, explain,
training, the CLI) and above what it assembles (the backbone, the methods, the checkpoint
format in :mod:`awt_engine.checkpoints`), so none of those imports a caller. Everything
heavy (torch, open_clip, a method) is imported when a model is made, so importing this
module (for :data:`DEFAULT_MODEL`, say) stays cheap.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

# The one definition of the defaults (classify, eval, explain, train and the API).
DEFAULT_MODEL = "ViT-B-16-quickgelu"  # the AWT, CoOp and LAMM papers' main backbone
DEFAULT_PRETRAINED = "openai"  # OpenAI's CLIP weights, which those papers use


class _DefaultWeights:
    """``pretrained`` left out: OpenAI's weights, or with a checkpoint the weights it was
    trained on (so ``model=`` alone never asks the hub for other weights), as the CLI."""

    def __repr__(self) -> str:
        return "<openai, or the checkpoint's weights>"

    def __reduce__(self) -> str:
        # pickled as the module's one instance, so ``is DEFAULT_WEIGHTS`` still holds in a
        # Ray actor that unpickles a ModelSource left at its default
        return "DEFAULT_WEIGHTS"


DEFAULT_WEIGHTS: Any = _DefaultWeights()


def load_model(
    model: str | None = None,
    pretrained: str | None = DEFAULT_WEIGHTS,
    *,
    checkpoint: str | Path | None = None,
    llm: str | None = None,
    device: str = "auto",
    precision: str | None = None,
    cache_root: str | Path | None = None,
):
    """The model behind the interface: a trained checkpoint (on the backbone it names, or
    on ``model``/``pretrained``: the same weights stored elsewhere), else zero-shot CLIP
    from (model, pretrained); ``model`` defaults to ViT-B-16-quickgelu. ``pretrained``
    left out means the checkpoint's weights with a checkpoint, else OpenAI's.
    ``cache_root``: the engine's cache root (int8's quantised graphs go there)."""
    if checkpoint is not None:
        from awt_engine.checkpoints import read_checkpoint_header

        if model and pretrained is DEFAULT_WEIGHTS:
            pretrained = read_checkpoint_header(checkpoint)["backbone"].get("pretrained")
        return load_trained(
            checkpoint,
            model=model,
            pretrained=weights_for(model, pretrained) if model else None,
            llm=llm,
            device=device,
            precision=precision,
            cache_root=cache_root,
        )
    from awt_engine.backbone import load_backbone
    from awt_engine.models.clip import ClipEmbedder

    model = model or DEFAULT_MODEL
    backbone = load_backbone(
        model,
        weights_for(model, pretrained),
        device=device,
        precision=precision,
        cache_root=cache_root,
    )
    return ClipEmbedder(backbone)


def weights_for(model: str, pretrained: str | None) -> str | None:
    """The ``pretrained`` to load ``model`` with: the default (OpenAI) when left out,
    none for ``local-dir:`` and ``hf-hub:`` ids, which carry their own weights."""
    given = DEFAULT_PRETRAINED if pretrained is DEFAULT_WEIGHTS else pretrained
    if given == DEFAULT_PRETRAINED and model.startswith(("local-dir:", "hf-hub:")):
        return None  # those ids carry their own weights (the CLI passes its default)
    return given


def load_trained(
    path: str | Path,
    *,
    model: str | None = None,
    pretrained: str | None = None,
    llm: str | None = None,
    device: str = "auto",
    precision: str | None = None,
    backbone=None,
    cache_root: str | Path | None = None,
):
    """The model a checkpoint describes, ready to score (eval mode, learned tensors in,
    ``checkpoint`` set to the file and its header).

    The backbone (and a method's LLM) are loaded as the checkpoint names them, or from
    ``model``/``pretrained`` and ``llm`` (the same weights stored elsewhere; ``pretrained``
    counts only with ``model``); weights other than the ones trained on are a
    :class:`~awt_engine.checkpoints.CheckpointError` naming both. The header (method, its
    settings and their bounds, labels) is checked before any weights load.
    """
    from awt_engine.checkpoints import CheckpointError, labels_from_record, read_checkpoint
    from awt_engine.models.base import TrainedInfo

    header, tensors = read_checkpoint(path)
    spec, config = _trained_config(path, header, llm)
    _check_precision(path, spec, backbone.precision if backbone is not None else precision)
    bb = header["backbone"]
    if backbone is None:
        from awt_engine.backbone import load_backbone

        name = model or bb["model"]
        weights = pretrained if model else bb.get("pretrained")
        backbone = load_backbone(
            name, weights, device=device, precision=precision, cache_root=cache_root
        )
    if backbone.fingerprint != bb["fingerprint"]:
        raise CheckpointError(
            f"checkpoint {path} was trained on backbone {bb['fingerprint']} "
            f"({bb['model']}); the backbone given is {backbone.fingerprint}"
        )
    net = spec.build(backbone, config)
    recorded = header.get("frozen", {})
    if net.frozen_parts() != recorded:
        raise CheckpointError(
            f"checkpoint {path} was trained with {recorded}; the models given are "
            f"{net.frozen_parts()}"
        )
    net.prepare(labels_from_record(header["labels"]), int(header.get("seed", 0)))
    try:
        net.load_learned(tensors)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    net.eval()
    net.checkpoint = TrainedInfo(Path(path), header)
    return net


def _trained_config(path, header: dict[str, Any], llm: str | None):
    """(method spec, config) of a checked header: the method known and every setting of
    the right type and within its bounds, so nothing absurd is ever allocated."""
    from awt_engine.checkpoints import CheckpointError
    from awt_engine.methods import get_method
    from awt_engine.methods.base import check_values

    try:
        spec = get_method(header["method"])
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    fields = {f.name for f in dataclasses.fields(spec.config)}
    values = {k: _tuple(v) for k, v in header["method_config"].items() if k in fields}
    if llm is not None:
        if "llm" not in fields:
            raise CheckpointError(f"{spec.name} has no LLM; --llm does not apply to {path}")
        values["llm"] = llm
    try:
        check_values(spec.config, values)
        return spec, spec.config(**values)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: {spec.name} setting {exc}") from None


def _check_precision(path, spec, precision: str | None) -> None:
    """A method that changes a tower's inside refused at int8, before any weights load."""
    from awt_engine.backbone.int8 import check_int8_method
    from awt_engine.checkpoints import CheckpointError

    try:
        check_int8_method(spec.name, getattr(spec.model, "int8_refusal", ""), precision)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None


def _tuple(v):
    return tuple(v) if isinstance(v, list) else v


__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_PRETRAINED",
    "DEFAULT_WEIGHTS",
    "load_model",
    "load_trained",
    "weights_for",
]
